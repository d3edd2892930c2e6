"""The field checks of a REST request body, one sentence each (the routes of `ui.api` and `ui.aesthetic_tab`)."""

from __future__ import annotations

from typing import Any

from finetune_core.errors import ConfigError


def refuse_unknown_fields(body: dict, allowed: set[str], route: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ConfigError(f"unknown field(s) in the {route} request: {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(allowed))}")


def object_field(body: dict, key: str) -> dict[str, Any]:
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"'{key}' must be an object of setting names and values, not {value!r}")
    return value


def required_text(body: dict, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"the request needs '{key}' as a non-empty string")
    return value.strip()
