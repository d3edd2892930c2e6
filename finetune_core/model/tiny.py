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
from finetune_core.model.interface import EPSILON, SD1, SD2, SDXL, V_PREDICTION, ModelIdentity

TINY_MODELS = ("tiny-sd1", "tiny-sd2", "tiny-sdxl")
# Bump when the weights a name builds change, so artefacts stamped with the old hash are told apart.
_WEIGHTS_VERSION = 1
_VOCAB = 49408
_BOS, _EOS = 49406, 49407


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


def _text_encoder(width: int, pad_id: int, with_projection: bool, quick_gelu: bool) -> Any:
    """A 2-layer CLIP text encoder at the real width and vocabulary (the SDXL paths read the penultimate layer)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=_VOCAB, hidden_size=width, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=width // 64, max_position_embeddings=77, projection_dim=width,
                            hidden_act="quick_gelu" if quick_gelu else "gelu", bos_token_id=_BOS,
                            eos_token_id=_EOS, pad_token_id=pad_id)
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _unet(spec: TinySpec) -> Any:
    """A 2-level UNet with cross-attention at the real context width (SDXL: text_time added conditioning)."""
    from diffusers import UNet2DConditionModel

    common: dict[str, Any] = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64),
                              "layers_per_block": 1, "cross_attention_dim": sum(spec.text_widths),
                              "norm_num_groups": 16, "attention_head_dim": 4}
    if spec.family == SDXL:
        # As SDXL: no attention at the highest resolution; pooled text (1280) + 6 size values x 256 Fourier dims.
        return UNet2DConditionModel(**common, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=256,
                                    projection_class_embeddings_input_dim=spec.text_widths[1] + 6 * 256)
    return UNet2DConditionModel(**common, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                use_linear_projection=spec.family == SD2)


def _vae(spec: TinySpec) -> Any:
    """A VAE with 4 levels (3 downsamples: 8x) and 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 32, 32),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
                         scaling_factor=spec.vae_scaling)


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
    spec = _SPECS.get(name)
    if spec is None:
        raise FinetuneError(f"There is no built-in model called {name!r}; choose one of {', '.join(TINY_MODELS)}.")
    # Built on the meta device: the libraries' own init would cost seconds and draw from the global RNG.
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        unet, vae = _unet(spec), _vae(spec)
        te = _text_encoder(spec.text_widths[0], _EOS if spec.family == SD1 else 0, False, spec.family != SD2)
        te2 = _text_encoder(1280, 0, True, False) if spec.family == SDXL else None
    modules = [m.to_empty(device="cpu") for m in (unet, vae, te, te2) if m is not None]
    unet, vae, te = modules[:3]
    te2 = modules[3] if te2 is not None else None
    generator = torch.Generator().manual_seed(1000 * _WEIGHTS_VERSION + spec.seed)
    for module in modules:
        randomize_weights(module, generator)
    identity = ModelIdentity(name, weights_shorthash(name, modules))
    return TinyComponents(spec, unet, vae, te, te2, identity)


def build_tiny(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """The tiny model `name` as a `DiffusersModel`."""
    from finetune_core.model.diffusers_backend import DiffusersModel

    c = tiny_components(name)
    return DiffusersModel(c.unet, c.vae, c.text_encoder, c.text_encoder_2, family=c.spec.family,
                          prediction_type=c.spec.prediction_type, identity=c.identity, device=device, dtype=dtype)
