"""A small txt2img sampler over the `DiffusionModel` interface, for previews and DreamBooth class images.

DDIM (eta 0) and Euler, with classifier-free guidance, for eps- and v-prediction models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from PIL import Image

from finetune_core.errors import ConfigError
from finetune_core.model.interface import ContextTransform, DiffusionModel, TextConditioning, TrainableEmbedding
from finetune_core.model.schedule import predicted_noise, predicted_x0

SAMPLERS = ("ddim", "euler")


@dataclass(frozen=True)
class SampleOptions:
    """How to sample: step count, guidance scale, image size in pixels, seed and sampler name."""

    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = 0
    sampler: str = "ddim"

    def validate(self, vae_scale: int = 8) -> None:
        """Raise ConfigError naming every bad field."""
        problems = []
        if not 1 <= self.steps <= 1000:
            problems.append(f"sampling steps must be between 1 and 1000, not {self.steps}")
        if self.width % vae_scale or self.height % vae_scale or min(self.width, self.height) <= 0:
            problems.append(f"image width and height must be positive multiples of {vae_scale}, "
                            f"not {self.width}x{self.height}")
        if self.sampler not in SAMPLERS:
            problems.append(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if problems:
            raise ConfigError(problems)


def ddim_timesteps(steps: int, n: int = 1000) -> list[int]:
    """Descending "uniform" DDIM timesteps with offset 1, as ldm's `make_ddim_timesteps` (Song et al., 2021)."""
    return [min(t + 1, n - 1) for t in range(0, n, max(n // steps, 1))][:steps][::-1]


def euler_timesteps(steps: int, n: int = 1000) -> list[int]:
    """Descending integer timesteps evenly spaced from n−1 to 0, as k-diffusion's `get_sigmas` spaces them."""
    return [round(float(t)) for t in torch.linspace(n - 1, 0, steps)]


def guided_output(model: DiffusionModel, x: torch.Tensor, t: int, cond: TextConditioning,
                  uncond: TextConditioning, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans, 2022): uncond + scale·(cond − uncond) of the raw model output."""
    ts = torch.full((x.shape[0],), t, dtype=torch.long)
    if cond.context.shape == uncond.context.shape:
        both = model.predict(torch.cat([x, x]), torch.cat([ts, ts]), TextConditioning.cat([uncond, cond]))
        out_uncond, out_cond = both.chunk(2)
    else:  # different chunk counts cannot share a batch
        out_uncond, out_cond = model.predict(x, ts, uncond), model.predict(x, ts, cond)
    return out_uncond + cfg_scale * (out_cond - out_uncond)


def sample_ddim(model: DiffusionModel, x: torch.Tensor, cond: TextConditioning, uncond: TextConditioning,
                options: SampleOptions, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from pure noise x_T to x_0 (Song et al., 2021, eq. 12)."""
    ac = model.alphas_cumprod().to(x.device)
    steps = ddim_timesteps(options.steps, len(ac))
    for i, t in enumerate(steps):
        out = guided_output(model, x, t, cond, uncond, options.cfg_scale)
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x0 = predicted_x0(x, out, tt, ac, model.prediction_type)
        eps = predicted_noise(x, out, tt, ac, model.prediction_type)
        a_prev = ac[steps[i + 1]] if i + 1 < len(steps) else ac[0]
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        if callback is not None:
            callback(i + 1, len(steps))
    return x


def sample_euler(model: DiffusionModel, x: torch.Tensor, cond: TextConditioning, uncond: TextConditioning,
                 options: SampleOptions, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Euler steps on the variance-exploding form x = x0 + σ·eps (Karras et al., 2022, Algorithm 2 without churn)."""
    ac = model.alphas_cumprod().to(x.device)
    steps = euler_timesteps(options.steps, len(ac))
    sigmas = [float(((1 - ac[t]) / ac[t]).sqrt()) for t in steps] + [0.0]
    x = x * sigmas[0]
    for i, t in enumerate(steps):
        scale_in = (sigmas[i] ** 2 + 1) ** -0.5  # the VP model sees sqrt(a)·x
        out = guided_output(model, x * scale_in, t, cond, uncond, options.cfg_scale)
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        denoised = predicted_x0(x * scale_in, out, tt, ac, model.prediction_type)
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            callback(i + 1, len(steps))
    return x


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """Pixels (B, 3, H, W) in [-1, 1] to RGB PIL images."""
    data = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(row, "RGB") for row in data]


def sample(model: DiffusionModel, prompts: list[str], negative_prompts: list[str] | None = None, *,
           steps: int = 20, cfg_scale: float = 7.0, width: int = 512, height: int = 512, seed: int = 0,
           embeddings: Mapping[str, TrainableEmbedding] | None = None,
           context_transform: ContextTransform | None = None, sampler: str = "ddim",
           callback: Callable[[int, int], None] | None = None) -> list[Image.Image]:
    """Generate one image per prompt; the same seed and settings give the same images."""
    options = SampleOptions(steps, cfg_scale, width, height, seed, sampler)
    options.validate(model.vae_scale)
    negatives = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
    if len(negatives) != len(prompts):
        raise ConfigError(f"got {len(prompts)} prompts but {len(negatives)} negative prompts; give one per prompt")
    generator = torch.Generator().manual_seed(seed)
    shape = (len(prompts), model.latent_channels, height // model.vae_scale, width // model.vae_scale)
    noise = torch.randn(shape, generator=generator).to(model.device)
    run = sample_ddim if sampler == "ddim" else sample_euler
    with torch.no_grad(), model.placement(), model.context_transform(context_transform):
        cond = model.encode_prompts(list(prompts), embeddings)
        uncond = model.encode_prompts(negatives, embeddings)
        latents = run(model, noise, cond, uncond, options, callback)
        return to_images(model.decode_latents(latents))
