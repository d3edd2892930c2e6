"""The one coercer: JSON/Python values must have their field's type; form text may spell a number; never truthy."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from finetune_core.errors import ConfigError
from finetune_core.settings import coerce_settings, parse_numbers, type_problems


@dataclass(frozen=True)
class Settings:
    steps: int = field(default=10, metadata={"label": "Max steps"})
    rate: float = 0.5
    text: str = "a"
    flag: bool = False
    decay: float | None = None


@pytest.mark.parametrize("values,expected", [
    ({"steps": 3, "rate": 1, "text": "b", "flag": True, "decay": None},
     {"steps": 3, "rate": 1.0, "text": "b", "flag": True, "decay": None}),
    ({"steps": 3.0, "text": 0.005}, {"steps": 3, "text": "0.005"}),  # lossless: JSON 3.0, a rate typed as a number
])
def test_json_values_of_the_right_type_pass(values, expected):
    assert coerce_settings(Settings, values, "test") == expected


@pytest.mark.parametrize("name,value", [
    ("flag", "false"), ("flag", "no"), ("flag", "true"), ("flag", 0), ("flag", 1), ("flag", None),
    ("steps", "10"), ("steps", 2.5), ("steps", True), ("steps", [1]), ("rate", "0.1"), ("rate", float("nan")),
    ("text", True), ("text", {"a": 1}), ("steps", None),
])
def test_json_values_of_the_wrong_type_are_refused_with_the_field_named(name, value):
    with pytest.raises(ConfigError, match=name):
        coerce_settings(Settings, {name: value}, "test")


def test_a_quoted_json_bool_gets_a_hint_and_unknown_names_are_listed():
    with pytest.raises(ConfigError, match="without quotes"):
        coerce_settings(Settings, {"flag": "false"}, "test")
    with pytest.raises(ConfigError, match="unknown test setting.*colour.*known: decay, flag"):
        coerce_settings(Settings, {"colour": 1}, "test")


def test_form_text_may_spell_numbers_but_not_bools():
    typed = coerce_settings(Settings, {"steps": " 1e3 ", "rate": "0.25", "decay": ""}, "test", from_text=True)
    assert typed == {"steps": 1000, "rate": 0.25, "decay": None}
    for bad in ({"flag": "yes"}, {"steps": "ten"}, {"rate": "inf"}, {"steps": ""}):
        with pytest.raises(ConfigError):
            coerce_settings(Settings, bad, "test", from_text=True)


def test_type_problems_of_an_instance():
    assert type_problems(Settings()) == []
    problems = type_problems(Settings(steps="10", flag="false", decay=1))  # type: ignore[arg-type]
    assert [p.split()[0] for p in problems] == ["steps", "flag"]


def test_number_lists():
    assert parse_numbers("1, 2.5,1", "layer structure") == [1.0, 2.5, 1.0]
    for bad in ("1, x", "1 2, 1", "nan, 1"):
        with pytest.raises(ConfigError, match="layer structure"):
            parse_numbers(bad, "layer structure")
