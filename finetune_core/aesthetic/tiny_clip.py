"""Built-in tiny CLIP models with deterministic random weights, so Aesthetic Gradients can be tried on the tiny
diffusion models (`tiny-sd1` ...) without a real CLIP on disk: like those, they are built in code, read no file and
download nothing.

Each keeps what the apply path needs of the real CLIP it stands for: the text projection is (text width x joint
width) with the text width of the tiny models' text encoders (768 as ViT-L/14 for tiny-sd1 and tiny-sdxl's first
encoder, 1024 as ViT-H/14 for tiny-sd2), and the image features are as wide as the joint space. The image tower is
two layers of width 64 on 32x32 pixels, so a folder of images is embedded in a fraction of a second on a CPU. The
embedding it makes means nothing about style; it is for trying the commands and testing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from finetune_core.errors import ArtifactError
from finetune_core.formats.clip_weights import Preprocess

# Bump when the weights a name builds change.
_WEIGHTS_VERSION = 1
_IMAGE, _PATCH = 32, 8
_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
           "image_size": _IMAGE, "patch_size": _PATCH, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


@dataclass(frozen=True)
class TinyClipSpec:
    """One built-in CLIP: its text width (that of the text encoder it fits), its joint width and its seed."""

    text_width: int
    dim: int
    seed: int
    fits: str  # the tiny models whose text encoder it fits, for messages and help


TINY_CLIPS = {
    "tiny-clip": TinyClipSpec(768, 768, 1, "tiny-sd1 and tiny-sdxl"),
    "tiny-clip-h": TinyClipSpec(1024, 1024, 2, "tiny-sd2"),
}
BUILT_IN = ", ".join(f"{name} (for {spec.fits})" for name, spec in TINY_CLIPS.items())


def is_tiny_clip(name: object) -> bool:
    """Whether `name` names a built-in CLIP (exactly; a built-in name wins over a file of the same name, as the
    tiny diffusion models' names do)."""
    return str(name).strip() in TINY_CLIPS


def tiny_clip_spec(name: str) -> TinyClipSpec:
    """What the built-in CLIP `name` is, or a sentence naming the built-in ones."""
    spec = TINY_CLIPS.get(name.strip())
    if spec is None:
        raise ArtifactError(f"there is no built-in CLIP called {name.strip()!r}; the built-in ones (random weights, "
                            f"to try things out) are {BUILT_IN}")
    return spec


def tiny_clip_parts(name: str, device: str | torch.device = "cpu") -> tuple[Any, torch.Tensor, Preprocess]:
    """(transformers CLIPVisionModelWithProjection, text projection (C, D), preprocessing) of the built-in CLIP
    `name`, the same weights every time; the global RNG is left untouched."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    # randomize_weights gives the tiny diffusion models their weights; loaded here so the WebUI's txt2img section,
    # which imports this room, does not load the diffusers backend the tiny models bring.
    from finetune_core.model.tiny import randomize_weights

    spec = tiny_clip_spec(name)
    config = CLIPVisionConfig(**_VISION, projection_dim=spec.dim)
    vision: Any
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # no library init, no draw from the global RNG
        vision = CLIPVisionModelWithProjection(config)
    vision = vision.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(1000 * _WEIGHTS_VERSION + spec.seed)
    randomize_weights(vision, generator)
    projection = torch.randn(spec.text_width, spec.dim, generator=generator) * spec.text_width ** -0.5
    vision = vision.to(torch.device(device), torch.float32).eval().requires_grad_(False)
    return vision, projection, Preprocess(_IMAGE, _IMAGE)


def tiny_clip_projection(name: str) -> torch.Tensor:
    """(C, D) float32: the text projection of the built-in CLIP `name` (as `tiny_clip_parts` gives it)."""
    return tiny_clip_parts(name)[1]
