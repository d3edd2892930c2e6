"""The diffusion training objective as pure functions: timesteps, noise, targets, weights, loss (the schedule
identities themselves live in `finetune_core.model.noise_schedule`).

Notation of Ho et al. (2020), "Denoising Diffusion Probabilistic Models": x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps,
with a_t = alphas_cumprod[t]. Randomness comes from explicit per-sample generators so a run is reproducible
and resumable sample by sample.
"""

from __future__ import annotations

import torch

from finetune_core.errors import ConfigError
from finetune_core.model.interface import EPSILON, V_PREDICTION
from finetune_core.model.noise_schedule import add_noise, snr, velocity_target

__all__ = ["add_noise", "min_snr_weights", "per_sample_mse", "sample_noise", "sample_timesteps", "training_target",
           "weighted_mse"]


def sample_timesteps(generators: list[torch.Generator], num_timesteps: int) -> torch.Tensor:
    """One integer timestep per sample, uniform over {0..T-1} (Ho et al. 2020, Algorithm 1)."""
    return torch.cat([torch.randint(0, num_timesteps, (1,), generator=g) for g in generators])


def sample_noise(shape: tuple[int, ...], generators: list[torch.Generator], offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise per sample, plus `offset` times a per-channel constant (Guttenberg 2023, "offset noise").

    shape is (B, C, h, w) with one generator per sample; noise += offset * randn(B, C, 1, 1).
    """
    per_sample = shape[1:]
    noise = torch.stack([torch.randn(per_sample, generator=g) for g in generators])
    if offset:
        channel = torch.stack([torch.randn((shape[1], 1, 1), generator=g) for g in generators])
        noise = noise + offset * channel
    return noise


def training_target(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """What the model should predict: eps for epsilon models, v for v-prediction models."""
    if prediction_type == EPSILON:
        return noise
    if prediction_type == V_PREDICTION:
        return velocity_target(latents, noise, timesteps, alphas_cumprod)
    raise ConfigError(f"unknown prediction type {prediction_type!r}; expected {EPSILON!r} or {V_PREDICTION!r}")


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, arXiv 2303.09556), as diffusers' `--snr_gamma`.

    eps: min(SNR, gamma) / SNR; v: min(SNR, gamma) / (SNR + 1), since the v loss already carries SNR + 1.
    """
    s = snr(timesteps, alphas_cumprod)
    clipped = torch.clamp(s, max=gamma)
    if prediction_type == V_PREDICTION:
        return clipped / (s + 1)
    return clipped / s


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, loss_weight: torch.Tensor | None = None,
                 snr_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in float32: per-sample mean (times the alpha-channel weight), then the SNR-weighted mean.

    loss_weight: (B, 1, h, w) element weights (the WebUI's PNG-alpha `weighted_loss`); snr_weight: (B,).
    fp32 as diffusers does (`F.mse_loss(pred.float(), target.float())`): fp16 squares overflow.
    """
    return per_sample_mse(pred, target, loss_weight, snr_weight).mean()


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor, loss_weight: torch.Tensor | None = None,
                   snr_weight: torch.Tensor | None = None) -> torch.Tensor:
    """`weighted_mse` before the batch mean: one float32 value per sample, shape (B,)."""
    err = (pred.float() - target.float()) ** 2
    if loss_weight is not None:
        err = err * loss_weight.to(err.device, torch.float32)
    per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
    if snr_weight is not None:
        per_sample = per_sample * snr_weight.to(per_sample.device, torch.float32)
    return per_sample
