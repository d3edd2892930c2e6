"""Setting values: the one coercer every host goes through (CLI, tab, REST, service), the number-list parser, and the
command-line flags made from the settings dataclasses (`learning_rate` -> `--learning-rate`).

Two sources, two rules, so a typo can never turn into a different setting:
- JSON bodies and Python callers (`from_text=False`): a value must already have its field's type. The only
  conversions are lossless ones: an int for a float field, a whole float for an int field (JSON clients do not tell
  10 from 10.0) and a number for a text field (a learning rate of 0.005). Everything else is refused: "false" or 1
  for a bool, "10" for a number, a list anywhere.
- Text typed into a form or a command line (`from_text=True`): the text of a number is parsed ("10", "1e-4").
  A bool still has to be a real bool: a checkbox or a --flag/--no-flag sends one, and text such as "no" never
  silently becomes a truth value.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from finetune_core.errors import ConfigError

Kind = Literal["int", "float", "str", "bool"]
_SCALARS: dict[Any, Kind] = {int: "int", float: "float", str: "str", bool: "bool"}
_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}


def kind_of(annotation: Any) -> tuple[Kind, bool]:
    """(kind, optional) of a field annotation: int/float/str/bool or Optional of them; anything else is "str"."""
    optional = False
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else str
    return _SCALARS.get(annotation, "str"), optional


def field_kinds(config_type: type) -> dict[str, tuple[Kind, bool]]:
    """Field name -> (kind, optional) for a settings dataclass (string annotations resolved)."""
    hints = typing.get_type_hints(config_type)
    return {f.name: kind_of(hints.get(f.name, f.type)) for f in dataclasses.fields(config_type)}


def coerce_value(value: Any, kind: Kind, optional: bool, name: str, label: str = "",
                 from_text: bool = False) -> Any:
    """`value` as a `kind`, or a ConfigError naming the field (see the module docstring for what converts)."""
    shown = f"{label} ({name})" if label and label != name else name
    if value is None or (from_text and isinstance(value, str) and not value.strip() and kind != "str"):
        if optional:
            return None
        if kind == "str" and from_text:
            return ""  # an empty dropdown sends None
        raise ConfigError(f"{shown} needs a value ({_WORDS[kind]})")
    converted = _convert(value, kind, from_text)
    if converted is _REFUSED:
        raise ConfigError(f"{shown} must be {_WORDS[kind]}, not {value!r}{_hint(value, kind, from_text)}")
    return converted


_REFUSED = object()


def _convert(value: Any, kind: Kind, from_text: bool) -> Any:
    if kind == "bool":
        return value if isinstance(value, bool) else _REFUSED
    if kind == "str":
        return str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else _REFUSED
    if isinstance(value, str) and from_text:
        try:
            value = float(value.strip())
        except ValueError:
            return _REFUSED
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return _REFUSED
    if kind == "float":
        return float(value)
    return int(value) if value == int(value) else _REFUSED


def _hint(value: Any, kind: Kind, from_text: bool) -> str:
    if isinstance(value, str) and not from_text and kind != "str":
        example = "true or false" if kind == "bool" else "a number"
        return f" (a quoted string; send {example} without quotes)"
    return ""


def coerce_settings(config_type: type, values: Mapping[str, Any], what: str,
                    from_text: bool = False) -> dict[str, Any]:
    """Every value of `values` coerced to its field of `config_type`; unknown names and all bad values in one error."""
    kinds = field_kinds(config_type)
    labels = {f.name: str(f.metadata.get("label", "")) for f in dataclasses.fields(config_type)}
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise ConfigError(f"unknown {what} setting(s): {', '.join(unknown)}; known: {', '.join(sorted(kinds))}")
    out: dict[str, Any] = {}
    problems: list[str] = []
    for name, value in values.items():
        kind, optional = kinds[name]
        try:
            out[name] = coerce_value(value, kind, optional, name, labels[name], from_text)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return out


def type_problems(config: Any) -> list[str]:
    """Fields of a settings dataclass instance whose value is not of the field's type (for `validate()`)."""
    problems = []
    for name, (kind, optional) in field_kinds(type(config)).items():
        value = getattr(config, name)
        if not _has_kind(value, kind, optional):
            problems.append(f"{name} must be {_WORDS[kind]}{' or empty' if optional else ''}, not {value!r}")
    return problems


def _has_kind(value: Any, kind: Kind, optional: bool) -> bool:
    if value is None:
        return optional
    if kind in ("bool", "str"):
        return isinstance(value, bool if kind == "bool" else str)
    if isinstance(value, bool) or not isinstance(value, int if kind == "int" else (int, float)):
        return False
    return math.isfinite(value)


def parse_numbers(text: Any, what: str) -> list[float]:
    """'1, 2, 1' -> [1.0, 2.0, 1.0]; a sentence naming the setting when a part is not a finite number."""
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        numbers = [math.nan]
    if not all(math.isfinite(n) for n in numbers):
        raise ConfigError(f"{what} {text!r} must be numbers separated by commas, e.g. '1, 2, 1'")
    return numbers


def offered_choices(meta: Mapping[str, Any]) -> tuple[tuple[Any, ...], str]:
    """(the choices a form or the CLI offers, a sentence naming those left out) of a field's metadata: a choice its
    `unavailable` callable names (an optimizer whose package is missing) is not offered, and the sentence says
    what to install."""
    choices = tuple(meta.get("choices", ()))
    missing = meta["unavailable"]() if "unavailable" in meta else {}
    if not missing:
        return choices, ""
    named = ", ".join(f"{name} ({why})" for name, why in missing.items())
    return tuple(c for c in choices if c not in missing), f" Not installed here: {named}."


# The flags issue #2 names, kept short; each maps to a settings field.
ALIASES = {"data_dir": ["--data"], "num_vectors": ["--vectors"], "neg_num_vectors": ["--neg-vectors"],
           "learning_rate": ["--lr"]}


def add_settings_flags(parser: argparse.ArgumentParser, section: str, config_type: type, taken: set[str],
                       defaults: Mapping[str, Any] | None = None) -> None:
    """One flag per field of `config_type`; help shows `defaults` (the method's own) over the field's default."""
    group = parser.add_argument_group(f"{section} settings")
    for f in dataclasses.fields(config_type):
        meta: Mapping[str, Any] = f.metadata or {}
        if f.name in taken or f.name == "version" or meta.get("hidden"):
            continue
        taken.add(f.name)
        flags = [f"--{f.name.replace('_', '-')}", *ALIASES.get(f.name, [])]
        default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        choices, left_out = offered_choices(meta)
        help_text = f"{meta.get('help', '')}{left_out} (default: {default!r})"
        dest = f"{section}:{f.name}"
        if f.type in (bool, "bool"):
            group.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        # Values stay text here: the settings coercer parses them (one sentence per bad value, not argparse's usage).
        metavar = "{" + ",".join(map(str, choices)) + "}" if choices else f.name.upper()
        group.add_argument(*flags, dest=dest, default=None, help=help_text, metavar=metavar)


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: one per physical core; fewer on a busy shared machine)")


MODEL_HELP = ("a .safetensors/.ckpt checkpoint, a diffusers folder, or tiny-sd1 (also tiny-sd2, tiny-sdxl: a random "
              "tiny model built in code, to try things out)")


def require_model(model: str | None) -> str:
    """The --model value, or the sentence saying what it may be (no model is never a silent tiny one)."""
    if not model:
        raise ConfigError(f"no model given: pass --model with {MODEL_HELP}")
    return model


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help lines end with the default, where there is one and the help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, "", False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"
