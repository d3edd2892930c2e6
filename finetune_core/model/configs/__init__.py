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


def tiny_overrides(family: str) -> dict[str, dict]:
    """Shipped configs shrunk to a few channels, keeping the topology the LDM key mapping depends on (for tests)."""
    unet: dict = {
        "block_out_channels": [8, 8, 16, 16],
        "norm_num_groups": 4,
        "attention_head_dim": 2,
        "cross_attention_dim": 16,
        "sample_size": 8,
    }
    if family == "sd2":
        unet["attention_head_dim"] = [2, 2, 4, 4]
    if family == "sdxl":
        unet.update(
            block_out_channels=[8, 16, 16],
            attention_head_dim=[2, 2, 4],
            transformer_layers_per_block=[1, 2, 2],
            cross_attention_dim=32,
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=16 + 6 * 4,
        )
    text = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": 64,
        "projection_dim": 16,
    }
    tiny = {
        "unet": unet,
        "vae": {"block_out_channels": [8, 8, 16, 16], "norm_num_groups": 4, "sample_size": 32},
        "text_encoder": text,
    }
    if family == "sdxl":
        tiny["text_encoder_2"] = dict(text)
    return {name: {**load_config(family, name), **values} for name, values in tiny.items()}
