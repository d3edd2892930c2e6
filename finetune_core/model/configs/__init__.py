"""Full-size diffusers configs of the SD1.5, SD2.1 and SDXL-base components, shipped so loading needs no network.

Layout: `<family>/<component>.json`; components are unet, vae, text_encoder, text_encoder_2 (SDXL only) and scheduler.
The SD2 scheduler says v_prediction (SD2.1-768); the single-file loader decides the real prediction type per file.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune_core.errors import ConfigError

_ROOT = Path(__file__).resolve().parent


def available_components(family: str) -> list[str]:
    """Names of the components shipped for `family` (e.g. ["scheduler", "text_encoder", "unet", "vae"])."""
    folder = _ROOT / family
    if not folder.is_dir():
        known = sorted(p.name for p in _ROOT.iterdir() if p.is_dir() and not p.name.startswith("_"))
        raise ConfigError(f"unknown model family {family!r}; known families: {', '.join(known)}")
    return sorted(p.stem for p in folder.glob("*.json"))


def load_config(family: str, component: str) -> dict:
    """A fresh copy of the shipped diffusers/transformers config dict of one component of one family."""
    names = available_components(family)
    if component not in names:
        raise ConfigError(f"family {family!r} has no component {component!r}; it has: {', '.join(names)}")
    return json.loads((_ROOT / family / f"{component}.json").read_text(encoding="utf-8"))
