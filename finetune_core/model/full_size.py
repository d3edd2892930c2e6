"""Full-size SD1/SD2/SDXL architectures with random weights, built from the shipped configs (benchmarks only)."""

from __future__ import annotations

from typing import Any

import torch

from finetune_core.model.configs import available_components, load_config
from finetune_core.model.diffusers_backend import DiffusersModel
from finetune_core.model.interface import ModelIdentity
from finetune_core.model.single_file import build_component
from finetune_core.model.tiny import randomize_weights


def full_size_random(family: str, seed: int = 0, device: str | torch.device = "cpu") -> Any:
    """A `DiffusersModel` with the real architecture of `family` and seeded random weights (no download)."""
    names = [n for n in ("unet", "vae", "text_encoder", "text_encoder_2") if n in available_components(family)]
    with torch.device("meta"):
        modules = {name: build_component(name, load_config(family, name)) for name in names}
    generator = torch.Generator().manual_seed(seed)
    for module in modules.values():
        module.to_empty(device="cpu")
        randomize_weights(module, generator)
    prediction = load_config(family, "scheduler").get("prediction_type", "epsilon")
    return DiffusersModel(modules["unet"], modules["vae"], modules["text_encoder"], modules.get("text_encoder_2"),
                          family=family, prediction_type=prediction,
                          identity=ModelIdentity(f"{family}-full-random", f"{seed:010x}"), device=device,
                          dtype=torch.float32)


def full_size_meta(family: str, dtype: torch.dtype = torch.float16) -> Any:
    """A `DiffusersModel` with the real architecture of `family` on the meta device: every shape, no memory and no
    weights (memory estimates for models that are not loaded)."""
    names = [n for n in ("unet", "vae", "text_encoder", "text_encoder_2") if n in available_components(family)]
    with torch.device("meta"):
        modules = {name: build_component(name, load_config(family, name)) for name in names}
    prediction = load_config(family, "scheduler").get("prediction_type", "epsilon")
    return DiffusersModel(modules["unet"], modules["vae"], modules["text_encoder"], modules.get("text_encoder_2"),
                          family=family, prediction_type=prediction,
                          identity=ModelIdentity(f"{family}-full-size", "0" * 10), device="meta", dtype=dtype)
