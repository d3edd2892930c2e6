"""Noise-schedule maths for DDPM-style latent diffusion: pure functions of tensors, k-diffusion style."""

from __future__ import annotations

import torch


def scaled_linear_alphas_cumprod(n: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's "scaled linear" schedule (ldm `make_beta_schedule("linear")`): betas linear in sqrt."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def _gather(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod[t] shaped to broadcast against `like` (B, ...)."""
    a = alphas_cumprod.to(like.device)[t.to(like.device).long()].to(torch.float32)
    return a.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The forward process q(x_t | x_0) of Ho et al. (2020), eq. 4: sqrt(a)·x0 + sqrt(1−a)·eps."""
    a = _gather(alphas_cumprod, t, x0)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                    alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The v-prediction target of Salimans & Ho (2022), sec. 4: v = sqrt(a)·eps − sqrt(1−a)·x0."""
    a = _gather(alphas_cumprod, t, x0)
    return (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(x0.dtype)


def predicted_x0(noisy: torch.Tensor, output: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                 prediction_type: str) -> torch.Tensor:
    """The clean-sample estimate from a model output (eps: Ho et al. 2020 eq. 15; v: Salimans & Ho 2022)."""
    a = _gather(alphas_cumprod, t, noisy)
    x, out = noisy.float(), output.float()
    if prediction_type == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * out
    return (x - (1 - a).sqrt() * out) / a.sqrt()



def snr(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a / (1 − a) per timestep, as used by min-SNR weighting (Hang et al., 2023)."""
    a = alphas_cumprod.to(t.device)[t.long()].to(torch.float32)
    return a / (1 - a)
