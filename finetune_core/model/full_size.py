"""Full-size SD1/SD2/SDXL architectures with random weights, built from the shipped configs (benchmarks only)."""

from __future__ import annotations

from typing import Any

import torch

from finetune_core.errors import ConfigError
from finetune_core.model.configs import available_components, load_config
from finetune_core.model.diffusers_backend import DiffusersModel
from finetune_core.model.interface import ModelIdentity
from finetune_core.model.single_file import build_component
from finetune_core.model.tiny import TINY_MODELS, randomize_weights, tiny_configs, tiny_spec


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


# architecture name -> family, for the memory measurement (`python -m finetune_core estimate --model ...`)
FULL_SIZE = {"sd15-full": "sd1", "sd2-full": "sd2", "sdxl-full": "sdxl"}


def fake_model(name: str, dtype: torch.dtype = torch.float16) -> Any:
    """A `DiffusersModel` of architecture `name` (a FULL_SIZE name or a tiny model's) built on fake tensors: call it
    inside a `FakeTensorMode` (`train.memory.fake_device`). Shapes and dtypes only: no weights, no memory."""

    if name in FULL_SIZE:
        family = FULL_SIZE[name]
        names = [n for n in ("unet", "vae", "text_encoder", "text_encoder_2") if n in available_components(family)]
        configs: dict[str, dict[str, Any]] = {n: load_config(family, n) for n in names}
        prediction = load_config(family, "scheduler").get("prediction_type", "epsilon")
    elif name in TINY_MODELS:
        spec = tiny_spec(name)
        family, prediction, configs = spec.family, spec.prediction_type, tiny_configs(spec)
    else:
        known = ", ".join([*FULL_SIZE, *TINY_MODELS])
        raise ConfigError(f"model architecture {name!r} is not known; choose one of {known}")
    with torch.device("meta"):  # built without initialising: values are not what is measured
        modules = {n: build_component(n, config) for n, config in configs.items()}
    for module in modules.values():
        _fake_from_meta(module, dtype)
    return DiffusersModel(modules["unet"], modules["vae"], modules["text_encoder"], modules.get("text_encoder_2"),
                          family=family, prediction_type=prediction, identity=ModelIdentity(name, "0" * 10),
                          device="cpu", dtype=dtype)


def _fake_from_meta(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give a module built on the meta device empty CPU tensors in place of its own, floating point ones in `dtype`
    (what `.to(dtype)` would give): inside a `FakeTensorMode` these are fake tensors, made without running the
    initialisers. A tensor shared by two modules stays shared."""

    made: dict[int, torch.Tensor] = {}

    def empty(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in made:
            kind = dtype if tensor.is_floating_point() else tensor.dtype
            new = torch.empty(tensor.shape, dtype=kind, device="cpu")
            if isinstance(tensor, torch.nn.Parameter):
                new = torch.nn.Parameter(new, requires_grad=tensor.requires_grad)
            made[id(tensor)] = new
        return made[id(tensor)]

    for owner in module.modules():
        for kind in ("_parameters", "_buffers"):
            table = getattr(owner, kind)
            for name, tensor in table.items():
                if tensor is not None:
                    table[name] = empty(tensor)
