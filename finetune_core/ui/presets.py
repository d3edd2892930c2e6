"""Presets: every setting of one method's form saved as JSON under `<logs>/presets/`, listed and loaded back."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from finetune_core.errors import ConfigError
from finetune_core.formats.atomic import atomic_write

PRESET_VERSION = 1
_NAME = re.compile(r"^[\w][\w .()+-]{0,79}$")


def presets_dir(logs: Path) -> Path:
    """The presets folder under a host's logs folder."""
    return Path(logs) / "presets"


def _path(folder: Path, method: str, name: str) -> Path:
    name = name.strip()
    if not _NAME.match(name):
        raise ConfigError(f"preset name {name!r} is not usable as a file name; use letters, digits, spaces, "
                          "'-', '_', '.', '(' or ')' (at most 80 characters)")
    return Path(folder) / f"{method}--{name}.json"


def list_presets(folder: Path, method: str) -> list[str]:
    """Names of the saved presets of `method`, sorted."""
    prefix = f"{method}--"
    if not Path(folder).is_dir():
        return []
    return sorted(p.stem[len(prefix):] for p in Path(folder).glob(f"{prefix}*.json"))


def save_preset(folder: Path, method: str, name: str, settings: dict[str, Any]) -> Path:
    """Write `settings` ({"name":…, "method": {...}, "data": {...}, "train": {...}}) as preset `name`; replaces it."""
    payload = {"version": PRESET_VERSION, "method": method, "settings": settings}
    text = json.dumps(payload, indent=2, sort_keys=True, default=str)
    return atomic_write(_path(folder, method, name), lambda tmp: tmp.write_text(text, encoding="utf-8"),
                        overwrite=True)


def load_preset(folder: Path, method: str, name: str) -> dict[str, Any]:
    """The settings saved as preset `name` of `method`; ConfigError when missing, unreadable or for another method."""
    path = _path(folder, method, name)
    if not path.is_file():
        raise ConfigError(f"preset '{name}' for {method} does not exist in {folder}; pick one from the list")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"preset file {path} is not readable JSON ({exc}); delete or fix it") from exc
    settings = payload.get("settings") if isinstance(payload, dict) else None
    if not isinstance(payload, dict) or payload.get("method") != method or not isinstance(settings, dict):
        raise ConfigError(f"preset file {path} is not a {method} preset saved by this tab")
    return payload["settings"]
