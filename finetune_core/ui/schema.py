"""Settings dataclasses -> plain field descriptions that forms, presets and the REST schema are built from."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finetune_core.errors import ConfigError
from finetune_core.settings import Kind, coerce_value, kind_of, offered_choices


@dataclass(frozen=True)
class FieldSpec:
    """One settings field as the UI sees it: name, kind ("int"/"float"/"str"/"bool"), default and labels."""

    name: str
    kind: Kind
    default: Any
    label: str
    help: str = ""
    choices: tuple[Any, ...] = ()
    advanced: bool = False
    optional: bool = False  # the dataclass field accepts None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly description (the REST `methods` schema)."""
        return {"name": self.name, "kind": self.kind, "default": self.default, "label": self.label,
                "help": self.help, "choices": list(self.choices), "advanced": self.advanced,
                "optional": self.optional}


def field_specs(config_type: type) -> list[FieldSpec]:
    """The FieldSpecs of a settings dataclass in declaration order; private, `version` and hidden fields skipped."""
    if not dataclasses.is_dataclass(config_type):
        raise TypeError(f"{config_type!r} is not a dataclass")
    hints = typing.get_type_hints(config_type)
    specs = []
    for f in dataclasses.fields(config_type):
        meta: Mapping[str, Any] = f.metadata or {}
        if f.name.startswith("_") or f.name == "version" or not f.init or meta.get("hidden"):
            continue
        kind, optional = kind_of(hints.get(f.name, f.type))
        choices, left_out = offered_choices(meta)
        specs.append(FieldSpec(name=f.name, kind=kind, default=_default_of(f), label=meta.get("label", _label(f.name)),
                               help=meta.get("help", "") + left_out, choices=choices,
                               advanced=bool(meta.get("advanced", False)), optional=optional))
    return specs


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _label(name: str) -> str:
    return name.replace("_", " ").capitalize()


def coerce_all(specs: list[FieldSpec], values: dict[str, Any]) -> dict[str, Any]:
    """Form values -> typed values with the one coercer in its form mode (the text of a number is parsed, a bool
    must be a checkbox's bool); all problems in one ConfigError. Unknown keys are kept for the service to refuse."""
    known = {s.name: s for s in specs}
    out: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in values.items():
        if key not in known:
            out[key] = value
            continue
        spec = known[key]
        try:
            out[key] = coerce_value(value, spec.kind, spec.optional, spec.name, spec.label, from_text=True)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return out


def with_defaults(specs: list[FieldSpec], overrides: dict[str, Any] | None) -> list[FieldSpec]:
    """The specs with defaults replaced by `overrides` (a method's form defaults, e.g. TI's learning rate)."""
    if not overrides:
        return list(specs)
    return [dataclasses.replace(s, default=overrides[s.name]) if s.name in overrides else s for s in specs]


def with_advanced(specs: list[FieldSpec], names: set[str]) -> list[FieldSpec]:
    """Mark `names` advanced, but only when the dataclass marks none itself (its own metadata wins)."""
    if any(s.advanced for s in specs):
        return list(specs)
    return [dataclasses.replace(s, advanced=True) if s.name in names else s for s in specs]
