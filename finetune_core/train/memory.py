"""A rough peak-memory estimate for a training run, shown before Train, with a suggestion when it will not fit.

It is an estimate, not a measurement: weights and optimizer state are counted exactly from the model, activations
use a rule of thumb (see `ACTIVATION_VALUES_PER_CELL`) that scales with batch × latent pixels × UNet channels.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune_core.errors import ConfigError
from finetune_core.model.full_size import full_size_meta
from finetune_core.model.interface import DiffusionModel
from finetune_core.model.session import PRECISIONS, compute_dtype

# Values the UNet keeps for backward per latent cell per base channel, at batch 1, without gradient checkpointing.
# Calibrated so SD1 at 512x512, batch 1, fp16 lands near the ~6 GB the WebUI's TI training is known to take.
ACTIVATION_VALUES_PER_CELL = 1500
CHECKPOINTING_FACTOR = 0.2  # gradient checkpointing keeps roughly a fifth of the activations
# Optimizer state bytes per trained value: Adam's two float32 moments; bitsandbytes' 8-bit AdamW keeps them in one
# byte each (plus block scales, negligible); Lion one momentum; Prodigy two moments plus its s and p0 copies.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "adamw8bit": 2, "lion": 4, "prodigy": 16, "sgd": 0}
GIB = 1024 ** 3
_DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class MemoryNeeds:
    """What a method adds to the loaded model, as the method itself counts it (`MethodSpec.memory`).

    trainable: values it trains; each costs a float32 master, a float32 gradient and the optimizer's state.
    replaces_model_weights: the trained values are the model's own weights (DreamBooth), so they are not also
        counted among the frozen weights; under fp16/bf16 autocast each also has a half-precision copy (autocast
        caches the cast of every trained weight for the forward and backward).
    extra_bytes: anything else it keeps on the device (an EMA copy, a discriminator, decoded images, ...).
    batch_factor: samples per dataset image in one forward (2 with prior preservation: each instance image has a
        class image beside it in the same UNet pass).
    artifact_bytes: size of one artefact file, for the disk checks (0: the trainable values in float32).
    """

    trainable: int
    replaces_model_weights: bool = False
    extra_bytes: int = 0
    batch_factor: int = 1
    artifact_bytes: int = 0

    @property
    def file_bytes(self) -> int:
        """Bytes one artefact file takes on disk."""
        return self.artifact_bytes or 4 * self.trainable


@dataclass(frozen=True)
class MemoryPlan:
    """The run settings that drive memory, whatever the method."""

    batch_size: int = 1
    width: int = 512
    height: int = 512
    precision: str = "fp16"  # the asked autocast: fp32 / fp16 / bf16
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    momentum: float = 0.0  # sgd keeps a momentum buffer only when this is set


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes by kind; `device_total` is the device's memory (None when unknown)."""

    parameters_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    total: int
    device_total: int | None
    suggestion: str

    def describe(self) -> str:
        """One paragraph for the tab: the parts, the total against the device, and the suggestion."""
        parts = (f"weights {_gib(self.parameters_bytes)}, gradients {_gib(self.gradients_bytes)}, optimizer "
                 f"{_gib(self.optimizer_bytes)}, activations ≈{_gib(self.activations_bytes)}")
        device = "" if self.device_total is None else f" of {_gib(self.device_total)} available"
        text = f"Estimated peak memory ≈{_gib(self.total)}{device} ({parts}). This is an estimate, not a measurement."
        return f"{text} {self.suggestion}".strip()


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def dtype_bytes(precision: str) -> int:
    """Bytes per value of a precision name; ConfigError for an unknown one."""
    if precision not in _DTYPE_BYTES:
        raise ConfigError(f"precision '{precision}' is unknown; use one of fp32, fp16 or bf16")
    return _DTYPE_BYTES[precision]


def model_parameters(model: DiffusionModel) -> int:
    """Number of weights in the model's modules (UNet, text encoders, and the VAE when the backend exposes it)."""
    modules = list(model.trainable_modules().values())
    vae = getattr(model, "vae", None)
    if isinstance(vae, torch.nn.Module):
        modules.append(vae)
    return _count(modules)


def _count(modules: list[torch.nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for module in modules:
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
    return total


def hypernetwork_parameters(widths: set[int], layers: tuple[float, ...]) -> int:
    """Weights of a WebUI hypernetwork: per context width, a k and a v MLP with layer sizes width × `layers`."""
    total = 0
    for width in widths:
        sizes = [int(width * m) for m in layers]
        per_mlp = sum(a * b + b for a, b in itertools.pairwise(sizes))
        total += 2 * per_mlp
    return total


def unet_base_channels(model: DiffusionModel) -> int:
    """Channels of the UNet's first convolution (320 for SD1/SD2/SDXL), found by module inspection."""
    unet = model.trainable_modules().get("unet")
    if unet is not None:
        for module in unet.modules():
            if isinstance(module, torch.nn.Conv2d) and module.in_channels == model.latent_channels:
                return int(module.out_channels)
    return 320


def activation_bytes(plan: MemoryPlan, base_channels: int, vae_scale: int = 8,
                     compute: torch.dtype | None = None, batch_factor: int = 1) -> int:
    """Rule of thumb: batch × latent cells × base channels × ACTIVATION_VALUES_PER_CELL values of the compute dtype."""
    cells = (plan.width // vae_scale) * (plan.height // vae_scale)
    values = plan.batch_size * batch_factor * cells * base_channels * ACTIVATION_VALUES_PER_CELL
    if plan.gradient_checkpointing:
        values = int(values * CHECKPOINTING_FACTOR)
    itemsize = dtype_bytes(plan.precision) if compute is None else torch.empty((), dtype=compute).element_size()
    return values * itemsize


def device_memory(device: torch.device | str) -> int | None:
    """Total memory of `device`: CUDA from torch, CPU from /proc/meminfo; None when unknown."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "cpu":
        meminfo = Path("/proc/meminfo")
        if meminfo.is_file():
            for line in meminfo.read_text().splitlines():
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    return None


def estimate_memory(model: DiffusionModel, needs: MemoryNeeds, plan: MemoryPlan,
                    device_total: int | None = -1) -> MemoryEstimate:
    """Peak memory of training with `needs` and `plan` on `model`; `device_total=-1` asks the model's device.

    Frozen weights count in the dtype the model holds them in; activations in the dtype the forward computes in.
    """
    dtype_bytes(plan.precision)  # a ConfigError for an unknown precision
    stored = model.dtype
    compute = compute_dtype(plan.precision, stored)
    frozen = model_parameters(model) - (needs.trainable if needs.replaces_model_weights else 0)
    params = frozen * torch.empty((), dtype=stored).element_size() + needs.trainable * 4
    if needs.replaces_model_weights and compute != torch.float32:
        params += needs.trainable * torch.empty((), dtype=compute).element_size()  # autocast's cast cache
    grads = needs.trainable * 4
    optimizer = needs.trainable * optimizer_state_bytes(plan)
    activations = activation_bytes(plan, unet_base_channels(model), model.vae_scale, compute, needs.batch_factor)
    activations += needs.extra_bytes
    total = params + grads + optimizer + activations
    if device_total == -1:
        device_total = device_memory(model.device)
    return MemoryEstimate(params, grads, optimizer, activations, total, device_total,
                          suggest(plan, total, device_total, optimizer))


def optimizer_state_bytes(plan: MemoryPlan) -> int:
    """Bytes of optimizer state per trained value for the plan's optimizer (ConfigError for an unknown one)."""
    if plan.optimizer not in OPTIMIZER_STATE_BYTES:
        raise ConfigError(f"optimizer '{plan.optimizer}' is unknown; use one of {', '.join(OPTIMIZER_STATE_BYTES)}")
    if plan.optimizer == "sgd":
        return 4 if plan.momentum else 0
    return OPTIMIZER_STATE_BYTES[plan.optimizer]


def suggest(plan: MemoryPlan, total: int, device_total: int | None, optimizer_bytes: int = 0) -> str:
    """What to change when `total` will not fit (or barely fits) in `device_total`."""
    if device_total is None or total <= 0.9 * device_total:
        return ""
    steps = []
    if not plan.gradient_checkpointing:
        steps.append("turn on gradient checkpointing")
    if plan.optimizer in ("adamw", "adam") and optimizer_bytes > total // 10:
        steps.append("use the adamw8bit optimizer (needs the bitsandbytes package)")
    if plan.precision in ("fp32", "float32"):
        steps.append("train in fp16 or bf16")
    if plan.batch_size > 1:
        steps.append(f"lower the batch size (e.g. {max(1, plan.batch_size // 2)}) and use gradient accumulation")
    if plan.width * plan.height > 512 * 512:
        steps.append("train at a smaller size")
    if not steps:
        steps.append("use --medvram in the WebUI or a smaller model")
    verdict = "exceeds" if total > device_total else "is close to"
    return f"This {verdict} the device's memory: " + "; ".join(steps) + "."


FIT_GIB = (8, 12, 16, 24)  # the usual consumer cards
FULL_SIZE = (("sd1", "SD1.5"), ("sdxl", "SDXL"))


def full_size_fits(needs_for: Callable[[DiffusionModel], MemoryNeeds], plan: MemoryPlan) -> dict[str, MemoryEstimate]:
    """The estimate for the full-size SD1.5 and SDXL architectures (built on the meta device: shapes, no memory),
    with frozen weights stored in the precision the plan computes in, as a GPU user loads them. Empty where
    diffusers, which builds them, is missing: inside the WebUI, whose loaded model is itself full size."""
    import importlib.util

    if importlib.util.find_spec("diffusers") is None:
        return {}

    out = {}
    for family, label in FULL_SIZE:
        model = full_size_meta(family, PRECISIONS.get(plan.precision, torch.float32))
        out[label] = estimate_memory(model, needs_for(model), plan, device_total=None)
    return out


def describe_fits(estimates: dict[str, MemoryEstimate]) -> str:
    """'SD1.5 ≈9.1 GiB: fits 12, 16, 24 GB (not 8 GB). SDXL ≈27.9 GiB: fits none of 8, 12, 16, 24 GB.'"""
    parts = []
    for label, estimate in estimates.items():
        fits = [size for size in FIT_GIB if estimate.total <= size * GIB * 0.95]  # the driver keeps a little
        if len(fits) == len(FIT_GIB):
            verdict = f"fits {', '.join(map(str, FIT_GIB))} GB"
        elif fits:
            misses = [size for size in FIT_GIB if size not in fits]
            verdict = f"fits {', '.join(map(str, fits))} GB (not {', '.join(map(str, misses))} GB)"
        else:
            verdict = f"fits none of {', '.join(map(str, FIT_GIB))} GB"
        parts.append(f"{label} ≈{_gib(estimate.total)}: {verdict}")
    return "With these settings, the full-size models: " + "; ".join(parts) + "."
