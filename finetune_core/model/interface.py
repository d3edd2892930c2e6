"""The DiffusionModel contract every trainer sees, and the small value types that cross it.

Both backends (diffusers, WebUI) implement `DiffusionModel`; `tests/model/test_contract.py` is the suite both pass.
Model-family differences (SD1/SD2/SDXL, eps/v) live behind this interface and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

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
    source: str = ""  # the checkpoint file or model folder the weights came from; "" for models built in code
    # The .yaml the host built the model from: the WebUI's `used_config`, or the `.yaml` next to a loaded checkpoint;
    # "" when none is known. A checkpoint written from this model copies it when the model needs one (v-prediction).
    config: str = ""


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

    @staticmethod
    def cat(parts: list[TextConditioning]) -> TextConditioning:
        # Prompts of different chunk counts are padded by repeating the last chunk's width is not needed here:
        # the backends always return whole 77-token chunks; callers concatenate only equal lengths.
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])  # type: ignore[misc]
        return TextConditioning(torch.cat([p.context for p in parts]), pooled)


@dataclass(frozen=True)
class TrainingSetup:
    """What a job does to the model for its duration (`DiffusionModel.training_session`).

    train: names from `trainable_modules()` whose own weights the job trains (DreamBooth: "unet", ...); they become
           float32 master weights with gradients, everything else is frozen.
    precision: the autocast the job asks for ("fp32", "fp16", "bf16"); the model decides what the forward really
               computes in (a model stored in fp16 computes in fp16 whatever was asked).
    gradient_checkpointing: recompute the UNet's blocks in backward instead of keeping their activations.
    vae_gradient_checkpointing: the same for the VAE decoder's blocks, for a loss that decodes latents with
        gradients (`decode_latents(grad=True)`: a reconstruction loss at 512 px keeps gigabytes otherwise).
    """

    train: tuple[str, ...] = ()
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    vae_gradient_checkpointing: bool = False


@dataclass
class TrainingSession:
    """What a model gives a job while `training_session` is active.

    modules: the trained modules (float32, requires_grad on); compute_dtype: the dtype the forward really runs in
    (it decides whether fp16 loss scaling is needed); autocast(): the mixed-precision context of one forward.
    """

    modules: dict[str, torch.nn.Module]
    compute_dtype: torch.dtype
    autocast: Callable[[], AbstractContextManager[Any]]


@dataclass(frozen=True)
class SampleRequest:
    """One txt2img call for previews and class images, in the WebUI's terms (sampler names as the WebUI's)."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = 0
    sampler: str = "DPM++ 2M"

    def infotext(self, model: ModelIdentity, extra: str = "") -> str:
        """The generation parameters of its first image as the WebUI writes them into a PNG (its PNG Info tab and
        "Send to txt2img" read them back)."""
        lines = [self.prompts[0]]
        if self.negative_prompts and self.negative_prompts[0]:
            lines.append(f"Negative prompt: {self.negative_prompts[0]}")
        lines.append(f"Steps: {self.steps}, Sampler: {self.sampler}, CFG scale: {self.cfg_scale:g}, Seed: {self.seed}, "
                     f"Size: {self.width}x{self.height}, Model hash: {model.shorthash[:10]}, Model: {model.name}"
                     + (f", {extra}" if extra else ""))
        return "\n".join(lines)


@dataclass(frozen=True)
class AdapterTarget:
    """A layer a weight adapter (LoRA) can attach to, named as kohya's sd-scripts names it: `lora_unet_...`,
    `lora_te_...` (SDXL: `lora_te1_...`, `lora_te2_...`), the names LoRA files carry (lora.md §3).

    block: "transformer" (the UNet's attention blocks), "resnet", "sampler" (down/upsampler convolutions) or "text".
    kernel_size is None for a linear layer; a convolution's adapter copies its kernel, stride and padding.
    """

    name: str
    module: str  # "unet", "text_encoder", "text_encoder_2"
    block: str
    in_features: int
    out_features: int
    kernel_size: tuple[int, int] | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    norm_groups: int = 0  # a norm layer: its GroupNorm groups, or -1 for a LayerNorm over the last axis
    norm_eps: float = 0.0

    @property
    def kind(self) -> str:
        """"norm", "conv" or "linear": which network types can adapt it."""
        return "norm" if self.norm_groups else "conv" if self.kernel_size else "linear"


@dataclass(frozen=True)
class NetworkCheck:
    """How the host's own loader took a network file on the loaded model: its modules, those applied, the keys of
    those it could not apply (by module name), and which loader it was."""

    loader: str
    total: int
    applied: int
    unmatched: tuple[str, ...] = ()
    error: str = ""  # the loader refused the whole file

    def line(self, name: str) -> str:
        return f"{name}: {self.applied} of {self.total} modules applied by {self.loader}"


class WeightAdapter(Protocol):
    """A change to one layer, given the layer's own (frozen) weight, which some changes depend on (DoRA, OFT, (IA)^3):
    its output change for an input, or the same change as a change of the weight (for layers the host computes from
    their weight directly, such as OpenCLIP's fused attention projections)."""

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor: ...

    def weight_delta(self, weight: torch.Tensor) -> torch.Tensor: ...


# Signature of a context transform (hypernetworks): given the attention context and whether it is cross-attention,
# return the (context for k, context for v). `is_cross` tells text cross-attention from self-attention.
ContextTransform = Callable[[torch.Tensor, bool], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class EncodedText:
    """What one text encoder makes of 77-token rows.

    hidden: (N, 77, C) the hidden states the model conditions on (its layer, clip skip applied), without emphasis.
    pooled: (N, C) the end-of-text token after the encoder's last layer and final layer norm: CLIP's pooled output
            before any projection (standalone SD2 keeps OpenCLIP's layers only up to the penultimate, so its pooled
            output is read there).
    """

    hidden: torch.Tensor
    pooled: torch.Tensor


@runtime_checkable
class TextChunks(Protocol):
    """One text encoder's 77-token chunk rows as a generation-time hook (`text_chunk_hook`) sees them."""

    key: str  # "clip_l" or "clip_g"
    tokens: torch.Tensor  # (N, 77) long, CPU: the ids the encoder reads (one row per prompt and chunk)
    hidden: torch.Tensor  # (N, 77, C): the hidden states the model will use (emphasis applied)
    token_table: str  # the name, in `parameters()`, of the vocabulary's token-embedding table

    def parameters(self) -> dict[str, torch.Tensor]:
        """The encoder's parameters `encode` reads, by name (no text projection); frozen, never to be changed."""
        ...

    def encode(self, params: Mapping[str, torch.Tensor] | None = None, rows: Sequence[int] | None = None,
               ids: torch.Tensor | None = None,
               token_rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> EncodedText:
        """Run rows through the model's own text path (embeddings spliced in, clip skip), the parameters named in
        `params` replaced by those tensors for this call (differentiable in them). rows: some of these rows (by
        index; None: all); ids: other rows instead (from `tokenize`; nothing spliced); token_rows: (vocabulary ids
        (k,), vectors (k, C)) that replace those rows of the token table (differentiable in the vectors), without
        copying the table."""
        ...

    def tokenize(self, text: str) -> torch.Tensor:
        """`text` as one (1, 77) row the way this encoder pads it (truncated to 75 tokens)."""
        ...

    def row_keys(self) -> list[str]:
        """Per row, a key that changes whenever what `encode` gives for it could: ids, spliced embedding vectors,
        model identity, the conditioning layer setting."""
        ...


# A generation-time hook on the text encoders (Aesthetic Gradients): called for every batch of 77-token chunk rows
# each encoder encodes; returns the (N, 77, C) hidden states to use instead of `chunks.hidden`.
ChunkHook = Callable[[TextChunks], torch.Tensor]


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

    def decode_latents(self, latents: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """Decode scaled latents (B, 4, h, w) to pixels (B, 3, 8h, 8w) in [-1, 1].

        grad=True keeps the graph (a reconstruction loss): the VAE stays frozen but gradients reach `latents`, and
        under a placement the VAE stays resident until the placement ends, since the graph holds its weights.
        """
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

    def text_chunk_hook(self, hook: ChunkHook) -> AbstractContextManager[None]:
        """While active, every batch of prompt chunks an encoder encodes passes through `hook` (see ChunkHook,
        TextChunks); one hook at a time; always undone on exit, also when the body raises."""
        ...

    def adapter_targets(self) -> dict[str, AdapterTarget]:
        """Every layer a LoRA may adapt (UNet transformer, resnet and sampler layers and their norms; the text
        encoders' attention and MLP layers), by kohya name; a query that changes nothing."""
        ...

    def adapter_weight(self, name: str) -> torch.Tensor:
        """The current weight of the layer `name` of `adapter_targets` (a fused weight's rows for OpenCLIP's q/k/v),
        for changes that depend on it (DoRA's magnitudes); a query that changes nothing."""
        ...

    def check_network_file(self, path: Path) -> NetworkCheck:
        """Load a network (LoRA) file with the host's own loader onto this model, as a user's `<lora:NAME:1>`
        would (inside the WebUI: the built-in Lora extension's loading and matching; standalone: our reader), and
        say how much of it applies; changes nothing."""
        ...

    def weight_adapters(self, adapters: Mapping[str, WeightAdapter]) -> AbstractContextManager[None]:
        """While active, each named layer's output is its own plus its adapter's (gradients reach the adapters,
        also through gradient checkpointing); a nested call replaces the outer set until it exits. An unknown name
        is a ModelMismatchError. Always undone on exit, also when the body raises."""
        ...

    # --- weights and jobs ---------------------------------------------------------------------------------
    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """The modules a method may train, by name: "unet", "text_encoder" (and "text_encoder_2" on SDXL).

        A query: it changes nothing (dtype, flags and placement stay as they are).
        """
        ...

    def training_session(self, setup: TrainingSetup) -> AbstractContextManager[TrainingSession]:
        """For one job: every weight frozen except `setup.train` (float32 masters), gradient checkpointing and the
        forward's precision as asked, host state that would change training undone; on exit the model is exactly
        as it was (values, dtypes, requires_grad, no .grad left), also when the job fails."""
        ...

    def placement(self) -> AbstractContextManager[None]:
        """While active, the modules autograd needs stay resident on `device` and no host hook moves them
        (medvram-aware hosts); entered once per phase of a job. A no-op where everything is resident."""
        ...

    def sample(self, request: SampleRequest, embeddings: Mapping[str, TrainableEmbedding] | None = None,
               context_transform: ContextTransform | None = None,
               adapters: Mapping[str, WeightAdapter] | None = None) -> list[Any]:
        """txt2img with the host's own samplers (WebUI: its samplers; standalone: diffusers schedulers) and the
        given extras applied (weight adapters replace any set active around the call); one PIL image per prompt;
        the same request gives the same images."""
        ...

    def sampler_names(self) -> list[str]:
        """The sampler names `sample` accepts."""
        ...

    def ldm_state_dict(self, modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The named trainable modules' weights as they are now, under the original LDM checkpoint keys
        (`model.diffusion_model.*`, `cond_stage_model.*` / `conditioner.embedders.N.*`), CPU, in their dtype."""
        ...
