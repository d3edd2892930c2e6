"""txt2img over the `DiffusionModel` interface with diffusers' schedulers, for standalone previews and class images.

Sampler names are the WebUI's, so a setting means the same in both hosts (inside the WebUI its own samplers run).
The schedulers are configured with Stable Diffusion's training schedule (scaled linear betas 0.00085..0.012 over
1000 steps, "leading" spacing with offset 1, as SD's own scheduler configs) and the model's prediction type.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from PIL import Image

from finetune_core.errors import ConfigError
from finetune_core.model.interface import (
    ContextTransform,
    DiffusionModel,
    SampleRequest,
    TextConditioning,
    TrainableEmbedding,
)

# WebUI sampler name -> (diffusers scheduler class, extra config)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {"set_alpha_to_one": False}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
}


def check_request(request: SampleRequest, vae_scale: int = 8) -> None:
    """Raise ConfigError naming every bad field of a sample request."""
    problems = []
    if not 1 <= request.steps <= 1000:
        problems.append(f"sampling steps must be between 1 and 1000, not {request.steps}")
    if request.width % vae_scale or request.height % vae_scale or min(request.width, request.height) <= 0:
        problems.append(f"image width and height must be positive multiples of {vae_scale}, "
                        f"not {request.width}x{request.height}")
    if request.sampler not in SAMPLERS:
        problems.append(f"unknown sampler {request.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if len(request.negative_prompts) != len(request.prompts):
        problems.append(f"got {len(request.prompts)} prompts but {len(request.negative_prompts)} negative prompts; "
                        "give one per prompt")
    if problems:
        raise ConfigError(problems)


def make_scheduler(name: str, prediction_type: str) -> Any:
    """A fresh diffusers scheduler for the WebUI sampler `name`."""
    import diffusers

    class_name, extra = SAMPLERS[name]
    return getattr(diffusers, class_name)(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, steps_offset=1, timestep_spacing="leading", **extra)


def guided_output(model: DiffusionModel, x: torch.Tensor, t: torch.Tensor, cond: TextConditioning,
                  uncond: TextConditioning, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans, 2022): uncond + scale·(cond − uncond) of the raw model output."""
    ts = t.reshape(1).expand(x.shape[0]).to(x.device)
    if cond.context.shape == uncond.context.shape:
        both = model.predict(torch.cat([x, x]), torch.cat([ts, ts]), TextConditioning.cat([uncond, cond]))
        out_uncond, out_cond = both.chunk(2)
    else:  # different chunk counts cannot share a batch
        out_uncond, out_cond = model.predict(x, ts, uncond), model.predict(x, ts, cond)
    return out_uncond + cfg_scale * (out_cond - out_uncond)


def denoise(model: DiffusionModel, scheduler: Any, noise: torch.Tensor, cond: TextConditioning,
            uncond: TextConditioning, request: SampleRequest,
            callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Run `scheduler` from pure noise to clean latents with classifier-free guidance."""
    step_kwargs: dict[str, Any] = {}
    if "generator" in inspect.signature(scheduler.step).parameters:  # ancestral samplers' fresh noise
        step_kwargs["generator"] = torch.Generator().manual_seed(request.seed + 1)
    scheduler.set_timesteps(request.steps, device=noise.device)
    latents = noise * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(latents, t)
        out = guided_output(model, x_in, t, cond, uncond, request.cfg_scale)
        latents = scheduler.step(out, t, latents, **step_kwargs).prev_sample
        if callback is not None:
            callback(i + 1, len(timesteps))
    return latents


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """Pixels (B, 3, H, W) in [-1, 1] to RGB PIL images."""
    data = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(row, "RGB") for row in data]


def sample(model: DiffusionModel, request: SampleRequest, embeddings: Mapping[str, TrainableEmbedding] | None = None,
           context_transform: ContextTransform | None = None,
           callback: Callable[[int, int], None] | None = None) -> list[Image.Image]:
    """One image per prompt; the same request gives the same images."""
    check_request(request, model.vae_scale)
    generator = torch.Generator().manual_seed(request.seed)
    shape = (len(request.prompts), model.latent_channels, request.height // model.vae_scale,
             request.width // model.vae_scale)
    noise = torch.randn(shape, generator=generator).to(model.device)
    scheduler = make_scheduler(request.sampler, model.prediction_type)
    with torch.no_grad(), model.placement(), model.context_transform(context_transform):
        cond = model.encode_prompts(list(request.prompts), embeddings)
        uncond = model.encode_prompts(list(request.negative_prompts), embeddings)
        latents = denoise(model, scheduler, noise, cond, uncond, request, callback)
        return to_images(model.decode_latents(latents))
