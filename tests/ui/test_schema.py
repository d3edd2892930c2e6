from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest

from finetune_core.errors import ConfigError
from finetune_core.ui.schema import FieldSpec, coerce_all, field_specs, with_advanced, with_defaults


@dataclass(frozen=True)
class Settings:
    version: int = 1
    steps: int = field(default=10, metadata={"label": "Max steps", "help": "how many"})
    rate: float = field(default=0.5, metadata={"label": "Rate", "help": "", "advanced": True})
    mode: str = field(default="a", metadata={"label": "Mode", "help": "", "choices": ["a", "b"]})
    flag: bool = field(default=False, metadata={"label": "Flag", "help": ""})
    decay: Optional[float] = field(default=None, metadata={"label": "Decay", "help": ""})  # noqa: UP045
    other: int | None = None


def test_field_specs_read_types_metadata_and_skip_version() -> None:
    specs = {s.name: s for s in field_specs(Settings)}
    assert "version" not in specs
    assert [specs[n].kind for n in ("steps", "rate", "mode", "flag", "decay", "other")] == \
        ["int", "float", "str", "bool", "float", "int"]
    assert specs["steps"].label == "Max steps" and specs["steps"].help == "how many"
    assert specs["rate"].advanced and not specs["steps"].advanced
    assert specs["mode"].choices == ("a", "b")
    assert specs["decay"].optional and specs["other"].optional and not specs["steps"].optional
    assert specs["other"].label == "Other"


def test_form_values_parse_number_text_but_never_cast_a_bool() -> None:
    specs = field_specs(Settings)
    typed = coerce_all(specs, {"steps": "6", "rate": 6, "flag": True, "decay": "", "mode": None})
    assert typed == {"steps": 6, "rate": 6.0, "flag": True, "decay": None, "mode": ""}
    assert isinstance(typed["steps"], int) and coerce_all(specs, {"steps": 6.0})["steps"] == 6
    for bad in ("true", "false", "no", 0, 1):  # a checkbox sends a bool; text is never truthy-cast
        with pytest.raises(ConfigError, match="Flag"):
            coerce_all(specs, {"flag": bad})
    with pytest.raises(ConfigError, match="Max steps"):
        coerce_all(specs, {"steps": 2.5})
    with pytest.raises(ConfigError) as info:
        coerce_all(specs, {"steps": "x", "rate": "nan", "unknown": 3})
    assert len(info.value.problems) == 2


def test_defaults_and_advanced_overrides() -> None:
    specs = field_specs(Settings)
    changed = {s.name: s.default for s in with_defaults(specs, {"steps": 99})}
    assert changed["steps"] == 99 and changed["rate"] == 0.5
    # The dataclass marks `rate` advanced itself, so the fallback list is ignored.
    assert {s.name for s in with_advanced(specs, {"flag"}) if s.advanced} == {"rate"}
    plain = [s for s in specs if s.name != "rate"]
    assert {s.name for s in with_advanced(plain, {"flag"}) if s.advanced} == {"flag"}


def test_an_optional_number_is_a_text_box_that_can_be_left_empty() -> None:
    """A Gradio number box cannot be empty (Gradio 4 sends 0 from it), and for an optional number empty means none:
    `validation_every` 0 was refused and `weight_decay` 0 would have replaced the method's default."""
    gr = pytest.importorskip("gradio")
    from finetune_core.ui.forms import component_for

    specs = {s.name: s for s in field_specs(Settings)}
    with gr.Blocks():
        optional = [component_for(gr, specs[name], name) for name in ("decay", "other")]
        required = component_for(gr, specs["steps"], "steps")
    assert all(isinstance(c, gr.Textbox) and c.value == "" for c in optional)
    assert isinstance(required, gr.Number) and required.value == 10
    assert coerce_all([specs["decay"], specs["other"]], {"decay": "", "other": " 3 "}) == {"decay": None, "other": 3}


def test_fields_share_rows_and_a_text_field_takes_one_partner() -> None:
    from finetune_core.ui.forms import _rows

    def spec(name: str, kind: str) -> FieldSpec:
        return FieldSpec(name=name, kind=kind, default=None, label=name)  # type: ignore[arg-type]

    specs = [spec("width", "int"), spec("height", "int"), spec("batch", "int"), spec("repeats", "int"),
             spec("init_text", "str"), spec("vectors", "int"), spec("template", "str"), spec("flag", "bool"),
             spec("prompt", "str"), spec("negative", "str"), spec("seed", "int")]
    rows = [[s.name for s in row] for row in _rows(specs, {"template": list})]
    assert rows == [["width", "height", "batch"], ["repeats", "init_text"], ["vectors"], ["template"],
                    ["flag", "prompt"], ["negative", "seed"]]
