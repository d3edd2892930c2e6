"""Tiny SD1 / SD2 / SDXL models with deterministic random weights, for tests and the demo.

They keep the real interfaces (vocabulary 49408, text widths 768 / 1024 / 768+1280, context 768 / 1024 / 2048,
4 latent channels, 8x VAE downscale, SDXL's pooled text and size conditioning) but are only a layer or two deep,
so a training step at 64x64 pixels runs in well under a second on a CPU.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from finetune_core.errors import FinetuneError
from finetune_core.model.configs import load_config
from finetune_core.model.diffusers_backend import DiffusersModel
from finetune_core.model.interface import EPSILON, SD1, SD2, SDXL, V_PREDICTION, ModelIdentity
from finetune_core.model.single_file import build_component

TINY_MODELS = ("tiny-sd1", "tiny-sd2", "tiny-sdxl")
# Bump when the weights a name builds change, so artefacts stamped with the old hash are told apart.
_WEIGHTS_VERSION = 2
_VOCAB = 49408


@dataclass(frozen=True)
class TinySpec:
    """What one tiny model is: family, objective and the widths that must match the real model."""

    family: str
    prediction_type: str
    text_widths: tuple[int, ...]
    vae_scaling: float
    seed: int


_SPECS = {
    "tiny-sd1": TinySpec(SD1, EPSILON, (768,), 0.18215, 1),
    "tiny-sd2": TinySpec(SD2, V_PREDICTION, (1024,), 0.18215, 2),
    "tiny-sdxl": TinySpec(SDXL, EPSILON, (768, 1280), 0.13025, 3),
}


@dataclass
class TinyComponents:
    """The diffusers/transformers modules of a tiny model and who it is."""

    spec: TinySpec
    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    identity: ModelIdentity


# The shipped full-size configs, shrunk: the LDM layout (4 UNet levels for SD1/SD2, 3 for SDXL, 2 resnets per
# level, attention where the real model has it) is kept so checkpoints convert both ways, and the real text widths
# and vocabulary are kept so embeddings and hypernetworks have the real shapes.
_UNET = {"block_out_channels": [32, 32, 64, 64], "norm_num_groups": 16, "attention_head_dim": 4, "sample_size": 8}
_UNET_SDXL = {"block_out_channels": [32, 64, 64], "norm_num_groups": 16, "attention_head_dim": [2, 4, 4],
              "transformer_layers_per_block": [1, 1, 1], "sample_size": 8}
_VAE = {"block_out_channels": [16, 16, 32, 32], "norm_num_groups": 8, "sample_size": 64}
_TEXT = {"intermediate_size": 128, "num_hidden_layers": 2, "max_position_embeddings": 77, "vocab_size": _VOCAB}


def tiny_spec(name: str) -> TinySpec:
    """What the built-in tiny model `name` is (its configs load single-file checkpoints written from it)."""
    if name not in _SPECS:
        raise FinetuneError(f"There is no built-in model called {name!r}; choose one of {', '.join(TINY_MODELS)}.")
    return _SPECS[name]


def tiny_configs(spec: TinySpec) -> dict[str, dict]:
    """Component name -> config dict of a tiny model of `spec`'s family."""
    family = spec.family
    unet = {**load_config(family, "unet"), **(_UNET_SDXL if family == SDXL else _UNET),
            "cross_attention_dim": sum(spec.text_widths)}
    if family == SD2:
        unet["attention_head_dim"] = [2, 2, 4, 4]
    configs = {"unet": unet, "vae": {**load_config(family, "vae"), **_VAE, "scaling_factor": spec.vae_scaling}}
    for index, width in enumerate(spec.text_widths):
        name = "text_encoder" if index == 0 else "text_encoder_2"
        configs[name] = {**load_config(family, name), **_TEXT, "hidden_size": width, "projection_dim": width,
                         "num_attention_heads": width // 64}
    return configs


def randomize_weights(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every parameter a non-zero random value from `generator` (no zero-init output layers).

    Norm affine parameters get random values around (1, 0.05): with the defaults (1, 0) a random CLIP's last
    hidden state averages to ~0 per token and the WebUI's emphasis rescaling divides by it.
    """
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    with torch.no_grad():
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                p.normal_(generator=generator)  # in place: the 49408-row embeddings are most of the build time
                if isinstance(sub, norms):
                    p.mul_(0.2).add_(1.0) if name == "weight" else p.mul_(0.1).add_(0.05)
                else:
                    p.mul_(p[0].numel() ** -0.5 if p.ndim >= 2 else 0.02)
        for name, buffer in module.named_buffers():
            if not name.endswith("position_ids"):
                raise RuntimeError(f"tiny model buffer {name} has no deterministic value")
            buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))


def weights_shorthash(name: str, modules: list[torch.nn.Module]) -> str:
    """First 10 hex digits of a sha256 over a sample of every parameter (cheap, and changes with any weight)."""
    digest = hashlib.sha256(name.encode())
    for module in modules:
        for pname, p in module.named_parameters():
            digest.update(pname.encode())
            digest.update(p.detach().flatten()[:64].to(torch.float32).numpy().tobytes())
    return digest.hexdigest()[:10]


def tiny_components(name: str) -> TinyComponents:
    """Build the modules of tiny model `name` with the same weights every time; the global RNG is left untouched."""
    spec = tiny_spec(name)

    # Built on the meta device: the libraries' own init would cost seconds and draw from the global RNG.
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        built = {name: build_component(name, config) for name, config in tiny_configs(spec).items()}
    modules = [m.to_empty(device="cpu") for m in built.values()]
    unet, vae, te = modules[:3]
    te2 = modules[3] if len(modules) > 3 else None
    generator = torch.Generator().manual_seed(1000 * _WEIGHTS_VERSION + spec.seed)
    for module in modules:
        randomize_weights(module, generator)
    identity = ModelIdentity(name, weights_shorthash(name, modules))
    return TinyComponents(spec, unet, vae, te, te2, identity)


def build_tiny(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """The tiny model `name` as a `DiffusersModel`."""
    c = tiny_components(name)
    return DiffusersModel(c.unet, c.vae, c.text_encoder, c.text_encoder_2, family=c.spec.family,
                          prediction_type=c.spec.prediction_type, identity=c.identity, device=device, dtype=dtype)
