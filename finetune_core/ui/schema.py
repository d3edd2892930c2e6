"""Settings dataclasses -> plain field descriptions that forms, presets and the REST schema are built from."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from finetune_core.errors import ConfigError

_SCALARS = {int: "int", float: "float", str: "str", bool: "bool"}


@dataclass(frozen=True)
class FieldSpec:
    """One settings field as the UI sees it: name, kind ("int"/"float"/"str"/"bool"), default and labels."""

    name: str
    kind: str
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
        kind, optional = _kind_of(hints.get(f.name, f.type))
        specs.append(FieldSpec(name=f.name, kind=kind, default=_default_of(f), label=meta.get("label", _label(f.name)),
                               help=meta.get("help", ""), choices=tuple(meta.get("choices", ())),
                               advanced=bool(meta.get("advanced", False)), optional=optional))
    return specs


def _kind_of(annotation: Any) -> tuple[str, bool]:
    """("int"|"float"|"str"|"bool", optional) for int/float/str/bool and Optional of them; other types are "str"."""
    optional = False
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else str
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "str", optional
    return _SCALARS.get(annotation, "str"), optional


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _label(name: str) -> str:
    return name.replace("_", " ").capitalize()


def coerce(spec: FieldSpec, value: Any) -> Any:
    """Turn a form or JSON value into the field's type; raises ConfigError naming the field when it cannot."""
    if value is None or (isinstance(value, str) and value.strip() == "" and spec.kind != "str"):
        if spec.optional:
            return None
        if spec.kind == "str":
            return ""
        raise ConfigError(f"'{spec.label}' ({spec.name}) needs a value")
    try:
        if spec.kind == "bool":
            return _to_bool(value)
        if spec.kind == "int":
            number = float(value)
            if number != int(number):
                raise ValueError("not a whole number")
            return int(number)
        if spec.kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"'{spec.label}' ({spec.name}) must be {_KIND_WORDS[spec.kind]}, got {value!r}") from exc


_KIND_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("not a boolean")


def coerce_all(specs: list[FieldSpec], values: dict[str, Any]) -> dict[str, Any]:
    """Coerce every known field in `values`; gathers all problems into one ConfigError. Unknown keys are kept."""
    known = {s.name: s for s in specs}
    out: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in values.items():
        if key not in known:
            out[key] = value
            continue
        try:
            out[key] = coerce(known[key], value)
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
