"""The DiffusionModel contract every trainer sees, and the small value types that cross it.

Both backends (diffusers, WebUI) implement `DiffusionModel`; `tests/model/test_contract.py` is the suite both pass.
Model-family differences (SD1/SD2/SDXL, eps/v) live behind this interface and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

# Family names used everywhere (artefact metadata, CLI, inspector).
SD1 = "sd1"
SD2 = "sd2"
SDXL = "sdxl"
FAMILIES = (SD1, SD2, SDXL)

EPSILON = "epsilon"
V_PREDICTION = "v_prediction"


@dataclass(frozen=True)
class ModelIdentity:
    """Who the base model is, stamped into artefacts as the WebUI does (`sd_checkpoint`, `sd_checkpoint_name`)."""

    name: str  # the WebUI's `model_name`: file stem, or e.g. "tiny-sd1"
    shorthash: str  # 10 hex digits (sha256[:10] of the checkpoint file, or of the tiny model's weights)


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of the model: its embedding key in TI files and its width."""

    key: str  # "clip_l" or "clip_g" (the WebUI's textual_inversion_key)
    width: int  # 768 (CLIP-L), 1024 (OpenCLIP-H), 1280 (OpenCLIP-bigG)


@dataclass
class TrainableEmbedding:
    """A textual-inversion embedding being trained or used: one (n_vectors, width) tensor per text encoder key.

    `name` is the word a prompt uses to refer to it; the backends splice the vectors in where it appears.
    """

    name: str
    vectors: dict[str, torch.Tensor]  # key -> (n_vectors, width); leaf tensors with requires_grad while training

    @property
    def n_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]


@dataclass
class TextConditioning:
    """What the text encoders give the UNet.

    context: (B, 77*k, C) cross-attention context (C = 768 SD1, 1024 SD2, 2048 SDXL).
    pooled: (B, 1280) pooled text embedding (SDXL only), else None.
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextConditioning:
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        return TextConditioning(self.context.to(device, dtype), pooled)

    def index(self, rows: list[int] | slice) -> TextConditioning:
        return TextConditioning(self.context[rows], None if self.pooled is None else self.pooled[rows])

    @staticmethod
    def cat(parts: list[TextConditioning]) -> TextConditioning:
        # Prompts of different chunk counts are padded by repeating the last chunk's width is not needed here:
        # the backends always return whole 77-token chunks; callers concatenate only equal lengths.
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])  # type: ignore[misc]
        return TextConditioning(torch.cat([p.context for p in parts]), pooled)


# Signature of a context transform (hypernetworks): given the attention context and whether it is cross-attention,
# return the (context for k, context for v). `is_cross` tells text cross-attention from self-attention.
ContextTransform = Callable[[torch.Tensor, bool], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class LatentMoments:
    """The VAE posterior of one or more images, already multiplied by the VAE scaling factor.

    A sample is `mean + std * noise`; `std` is zero-sized-free: it always has the shape of `mean`.
    """

    mean: torch.Tensor
    std: torch.Tensor


@runtime_checkable
class DiffusionModel(Protocol):
    """The model as trainers see it. All tensors in and out are on `self.device` unless a method says otherwise."""

    family: str  # SD1 / SD2 / SDXL
    prediction_type: str  # EPSILON / V_PREDICTION
    identity: ModelIdentity
    # SD1: (clip_l 768,), SD2: (clip_l 1024,), SDXL: (clip_l 768, clip_g 1280)
    text_encoders: tuple[TextEncoderSpec, ...]
    latent_channels: int  # 4
    vae_scale: int  # pixels per latent cell: 8

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the frozen weights compute in (fp32, or fp16/bf16 when loaded half)."""
        ...

    @property
    def context_width(self) -> int:
        """Width of the cross-attention context: sum of the text encoder widths (768 / 1024 / 2048)."""
        ...

    def alphas_cumprod(self) -> torch.Tensor:
        """The training noise schedule, float32, shape (1000,), on the CPU."""
        ...

    # --- text ---------------------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Number of tokens the prompt takes (without BOS/EOS), counting each known embedding as its vectors."""
        ...

    def token_vectors(self, text: str) -> dict[str, torch.Tensor]:
        """Raw token embeddings of `text` (no BOS/EOS) per text encoder key: key -> (n_tokens, width), CPU, float32.

        Used to initialise a textual-inversion embedding from an init text, as the WebUI does.
        """
        ...

    def encode_prompts(self, prompts: list[str],
                       embeddings: Mapping[str, TrainableEmbedding] | None = None) -> TextConditioning:
        """Encode prompts as in generation (75-token chunks, clip skip as the family uses), splicing in embeddings.

        Gradients flow into the embeddings' vectors; the text encoders themselves stay frozen unless a method
        trains them. Prompts that need different chunk counts are padded to the longest with empty chunks.
        """
        ...

    # --- images -------------------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> LatentMoments:
        """VAE-encode pixels (B, 3, H, W) in [-1, 1] to scaled latent moments; no gradients."""
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode scaled latents (B, 4, h, w) to pixels (B, 3, 8h, 8w) in [-1, 1]; no gradients."""
        ...

    # --- denoiser -----------------------------------------------------------------------------------------
    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning,
                size_cond: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's output (eps or v, per `prediction_type`) for noisy latents at integer timesteps.

        size_cond: (B, 6) float = original (h, w), crop (top, left), target (h, w) in pixels; SDXL uses it,
        the others ignore it. None means "the latents' own size, no crop".
        """
        ...

    def context_transform(self, transform: ContextTransform | None) -> AbstractContextManager[None]:
        """While active, every attention layer computes k from transform(ctx)[0] and v from transform(ctx)[1].

        Hypernetworks use this. It is always undone on exit.
        """
        ...

    def attention_context_widths(self) -> dict[str, set[int]]:
        """Context widths of the model's attention layers: {"cross": {768}, "self": {320, 640, ...}}."""
        ...

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """Modules a weight-training method may unfreeze: "unet", "text_encoder" (and "text_encoder_2" on SDXL)."""
        ...

    def placement(self) -> AbstractContextManager[None]:
        """While active, the modules an autograd step needs are resident on `device` (medvram-aware hosts).

        The standalone backend keeps everything resident, so this is a no-op there.
        """
        ...


@dataclass
class ModelSummary:
    """A plain description of a loaded model for logs, lint and the UI."""

    family: str
    prediction_type: str
    name: str
    shorthash: str
    context_width: int
    text_widths: list[int] = field(default_factory=list)


def summarize(model: DiffusionModel) -> ModelSummary:
    """Describe `model` in plain values."""
    return ModelSummary(model.family, model.prediction_type, model.identity.name, model.identity.shorthash,
                        model.context_width, [t.width for t in model.text_encoders])
