import random
from pathlib import Path

import pytest

from finetune_core.data.templates import available_templates, draw_line, load_template, render_prompt, resolve_template
from finetune_core.errors import ConfigError

WEBUI_NAMES = ["hypernetwork.txt", "none.txt", "style.txt", "style_filewords.txt", "subject.txt",
               "subject_filewords.txt"]


def test_ships_the_six_webui_names_with_lines():
    shipped = available_templates()
    for name in WEBUI_NAMES:
        assert name in shipped
        assert load_template(name)
    assert all("[name]" in line for line in load_template("style.txt"))
    assert all("[filewords]" in line for line in load_template("subject_filewords.txt"))
    assert not any("[name]" in line for line in load_template("hypernetwork.txt"))


def test_resolve_by_basename_stem_and_path(tmp_path: Path):
    assert resolve_template("subject").name == "subject.txt"
    own = tmp_path / "mine.txt"
    own.write_text("one [name]\n\n two [filewords] \n", encoding="utf-8")
    assert resolve_template(str(own)) == own
    assert load_template(str(own)) == ["one [name]", "two [filewords]"]


def test_unknown_template_lists_available_names():
    with pytest.raises(ConfigError) as info:
        resolve_template("nope.txt")
    message = str(info.value)
    assert "nope.txt" in message and "style_filewords.txt" in message and "subject.txt" in message


def test_empty_template_is_an_error(tmp_path: Path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no lines"):
        load_template(str(empty))


def test_render_and_draw():
    assert render_prompt("[name] by [filewords], [name]", "tok", "a, b") == "tok by a, b, tok"
    lines = load_template("subject.txt")
    drawn = {draw_line(lines, random.Random(seed)) for seed in range(30)}
    assert len(drawn) > 3 and drawn <= set(lines)
