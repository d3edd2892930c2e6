from __future__ import annotations

from pathlib import Path

import pytest

from finetune_core.errors import ConfigError
from finetune_core.ui.presets import list_presets, load_preset, save_preset


def test_presets_are_per_method_and_replace_on_save(tmp_path: Path) -> None:
    save_preset(tmp_path, "textual-inversion", "fast", {"train": {"steps": 10}})
    save_preset(tmp_path, "textual-inversion", "fast", {"train": {"steps": 20}})
    save_preset(tmp_path, "hypernetwork", "slow", {"train": {"steps": 5}})
    assert list_presets(tmp_path, "textual-inversion") == ["fast"]
    assert list_presets(tmp_path, "hypernetwork") == ["slow"]
    assert load_preset(tmp_path, "textual-inversion", "fast") == {"train": {"steps": 20}}
    assert list_presets(tmp_path / "missing", "x") == []


def test_bad_names_and_foreign_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not usable as a file name"):
        save_preset(tmp_path, "m", "../evil", {})
    (tmp_path / "m--broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        load_preset(tmp_path, "m", "broken")
    (tmp_path / "m--other.json").write_text('{"method": "x", "settings": {}}')
    with pytest.raises(ConfigError, match="not a m preset"):
        load_preset(tmp_path, "m", "other")
