"""One optimizer step, read like the diffusers step: batch -> noise -> timesteps -> noisy -> target -> loss ->
backward -> clip -> step, each stage a named call. The maths lives in `objective`, the randomness in `randomness`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from finetune_core.data.cache import TextCache
from finetune_core.data.data_batch import DataBatch, TrainingData
from finetune_core.model.interface import DiffusionModel
from finetune_core.train import objective, randomness
from finetune_core.train.distributed import Processes
from finetune_core.train.ema import ParameterAverages
from finetune_core.train.lr_schedule import value_at
from finetune_core.train.optim import clip_gradients, clip_group_norms, gradients_finite
from finetune_core.train.train_batch import TrainBatch

if TYPE_CHECKING:  # train sits below methods: the protocol is for hints only
    from finetune_core.train.method import Method

OVERFLOW = "fp16 overflow"  # a skipped step the NaN guard does not count


@dataclass
class StepContext:
    """Everything a step needs, built once per run by the loop."""

    model: DiffusionModel
    method: Method
    data: TrainingData
    optimizer: torch.optim.Optimizer
    scaler: Any  # torch GradScaler (a pass-through when disabled)
    params: list[torch.Tensor]
    seed: int
    accumulation: int
    autocast: Callable[[], AbstractContextManager[Any]]  # the session's mixed precision for one forward
    min_snr_gamma: float
    noise_offset: float
    clip_mode: str
    clip_schedule: list[tuple[float, int]]
    alphas_cumprod: torch.Tensor
    text_cache: TextCache | None
    averages: ParameterAverages = dataclasses.field(default_factory=lambda: ParameterAverages([]))
    processes: Processes = dataclasses.field(default_factory=Processes)  # data-parallel: this process's share


@dataclass(frozen=True)
class StepOutcome:
    """What a step did: ok False means it was skipped (non-finite loss or gradients)."""

    ok: bool
    loss: float
    prompt: str
    pixel_size: tuple[int, int]  # (height, width) of the training images, for previews
    reason: str = ""


def needs_loss_scaling(device: torch.device, compute_dtype: torch.dtype) -> bool:
    """fp16 gradients underflow on CUDA without loss scaling; the dtype is what the forward really computes in
    (the WebUI runs an fp16 model in fp16 whatever the job asked)."""
    return device.type == "cuda" and compute_dtype == torch.float16


def make_grad_scaler(device: torch.device, compute_dtype: torch.dtype) -> Any:
    """A GradScaler where `needs_loss_scaling`; elsewhere a pass-through."""
    enabled = needs_loss_scaling(device, compute_dtype)
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # the WebUI's torch 2.1


def to_device(batch: DataBatch, device: torch.device) -> DataBatch:
    """The data batch with its tensors (and tensor extras) on `device`."""
    def move(value: Any) -> Any:
        return value.to(device) if isinstance(value, torch.Tensor) else value
    return dataclasses.replace(batch, latents=batch.latents.to(device, torch.float32), size_cond=move(batch.size_cond),
                               loss_weight=move(batch.loss_weight), pixels=move(batch.pixels),
                               extras={k: move(v) for k, v in batch.extras.items()})


def build_train_batch(ctx: StepContext, data: DataBatch, first: int, noise: torch.Tensor | None = None,
                      timesteps: torch.Tensor | None = None) -> TrainBatch:
    """Draw noise and timesteps for samples `first`... of the run (or take the given ones: the validation loss's
    fixed draws) and assemble the noisy latents and the target."""
    device = ctx.model.device
    data = to_device(data, device)
    latents = data.latents
    # one generator per sample, keyed by the global sample number: batch 2 x accumulation 1, batch 1 x
    # accumulation 2 and two processes of batch 1 each draw the same noise for the same samples
    samples = range(first, first + len(data))
    if noise is None:
        noise = objective.sample_noise(tuple(latents.shape), randomness.generators(ctx.seed, randomness.NOISE,
                                                                                   samples), ctx.noise_offset)
    if timesteps is None:
        timesteps = objective.sample_timesteps(randomness.generators(ctx.seed, randomness.TIMESTEPS, samples),
                                               ctx.alphas_cumprod.shape[0])
    noise, timesteps = noise.to(device), timesteps.to(device)
    alphas = ctx.alphas_cumprod.to(device)
    noisy = objective.add_noise(latents, noise, timesteps, alphas)
    target = objective.training_target(ctx.model.prediction_type, latents, noise, timesteps, alphas)
    snr_weight = None
    if ctx.min_snr_gamma > 0:
        snr_weight = objective.min_snr_weights(timesteps, alphas, ctx.min_snr_gamma, ctx.model.prediction_type)
    cond = None
    if ctx.text_cache is not None:
        with ctx.autocast():
            cond = ctx.text_cache.encode(ctx.model, data.prompts).to(device)  # cached on the CPU
    return TrainBatch(data=data, latents=latents, noise=noise, timesteps=timesteps, noisy_latents=noisy,
                      target=target, alphas_cumprod=alphas, size_cond=data.size_cond, loss_weight=data.loss_weight,
                      snr_weight=snr_weight, cond=cond)


def compute_loss(ctx: StepContext, batch: TrainBatch, index: int) -> torch.Tensor:
    """The method's loss under autocast, with the global RNG (dropout) seeded from the micro-batch number."""
    device = ctx.model.device
    # several processes: each its own dropout draws (one shared seed would repeat the same masks per slice)
    stream = randomness.FORWARD if ctx.processes.rank == 0 else f"{randomness.FORWARD}:{ctx.processes.rank}"
    seed = randomness.stream_seed(ctx.seed, stream, index)
    with randomness.seeded_global_rng(seed, device), ctx.autocast():
        return ctx.method.loss(ctx.model, batch)


def micro_loss(ctx: StepContext, full: DataBatch, index: int) -> torch.Tensor | None:
    """This process's part of the loss of micro-batch `index`, weighted by its share of the global batch and
    divided by the accumulation (WebUI: loss / gradient_step); None when its slice is empty."""
    shard = ctx.processes.shard(full)
    if len(shard.data) == 0:
        return None
    batch = build_train_batch(ctx, shard.data, index * len(full) + shard.start)
    loss = compute_loss(ctx, batch, index) / ctx.accumulation
    return loss if shard.weight == 1.0 else loss * shard.weight


def apply_update(ctx: StepContext, step: int) -> tuple[bool, str]:
    """Sum the processes' gradients, unscale, check and clip them, then step the optimizer; (False, why) when the
    step is skipped (every process decides the same, from the same summed gradients)."""
    ctx.processes.sum_gradients(ctx.params)
    ctx.scaler.unscale_(ctx.optimizer)
    if not gradients_finite(ctx.params):
        if not ctx.scaler.is_enabled():
            return False, "non-finite gradients"
        # fp16: the scaler backs off; an overflow at a scale >= 1 is calibration, not yet a divergence
        overflow = ctx.scaler.get_scale() >= 1.0
        ctx.scaler.update()
        return False, OVERFLOW if overflow else "non-finite gradients"
    if ctx.clip_mode != "disabled":
        clip_gradients(ctx.params, ctx.clip_mode, value_at(ctx.clip_schedule, step))
    clip_group_norms(ctx.optimizer)
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    return True, ""


def train_step(ctx: StepContext, attempt: int, step: int) -> StepOutcome:
    """One optimizer step over `accumulation` micro-batches; skips the update when anything is non-finite."""
    total, prompt, size = 0.0, "", (0, 0)
    try:
        for micro in range(ctx.accumulation):
            index = attempt * ctx.accumulation + micro
            full = ctx.data.get_batch(index, ctx.seed)
            prompt = full.prompts[0] if full.prompts else ""
            scale = ctx.model.vae_scale
            size = (full.latents.shape[-2] * scale, full.latents.shape[-1] * scale)
            loss = micro_loss(ctx, full, index)
            # the global batch's loss: every process sees the same value, so all skip a non-finite step together
            value = ctx.processes.total(float(loss.detach()) if loss is not None else 0.0)
            if not math.isfinite(value):
                return StepOutcome(False, value, prompt, size, "non-finite loss")
            if loss is not None:
                ctx.processes.backward(ctx.scaler.scale(loss), ctx.params, ends_step=micro == ctx.accumulation - 1)
            total += value
        ok, reason = apply_update(ctx, step)
    finally:
        ctx.optimizer.zero_grad(set_to_none=True)
    if ok:
        ctx.method.after_step(ctx.model)
        ctx.averages.update(step + 1)
    return StepOutcome(ok, total, prompt, size, reason)
