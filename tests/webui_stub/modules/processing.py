"""Stand-in for modules/processing.py: txt2img as far as a trainer's previews meet it.

Kept from the real one: the class-level conditioning caches (`cached_c` / `cached_uc`, shared by every instance,
keyed by the prompts, extra networks and settings but not by embedding values, cleared by `close()` only without
`persistent_cond_cache`), `<lora:...>` tags cut from the prompts and handed to the Lora extension (unless
`disable_extra_networks`; with no tag it is called with none, which unloads the last generation's), conditioning through `prompt_parser` and the hijacked text encoders, sampling through
`sd_model.apply_model` (so the lowvram hooks move the UNet in) and decoding through `decode_first_stage` (the
lowvram VAE wrapper), everything under `devices.autocast()`, and `shared.state` bookkeeping. The sampler itself is
a plain deterministic DDIM, whatever name is asked for.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from modules import devices, extra_networks, prompt_parser, shared


class StableDiffusionProcessing:
    cached_uc = [None, None]
    cached_c = [None, None]

    def __init__(self, sd_model=None, prompt="", negative_prompt="", batch_size=1, n_iter=1, steps=50,
                 sampler_name=None, scheduler=None, cfg_scale=7.0, width=512, height=512, seed=-1,
                 do_not_save_grid=False, do_not_save_samples=False, do_not_reload_embeddings=False, **kwargs):
        self.sd_model = sd_model
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.batch_size, self.n_iter, self.steps = batch_size, n_iter, steps
        self.sampler_name, self.scheduler, self.cfg_scale = sampler_name, scheduler, cfg_scale
        self.width, self.height, self.seed = width, height, seed
        self.do_not_save_grid, self.do_not_save_samples = do_not_save_grid, do_not_save_samples
        self.do_not_reload_embeddings = do_not_reload_embeddings
        self.disable_extra_networks = False
        self.scripts = None
        self.extra_network_data = {}
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c

    def cached_params(self, required_prompts, steps):
        networks = tuple((k, tuple(tuple(a) for a in v)) for k, v in sorted(self.extra_network_data.items()))
        return (tuple(required_prompts), steps, networks, shared.opts.CLIP_stop_at_last_layers,
                shared.sd_model.sd_checkpoint_info, self.width, self.height)

    def get_conds_with_caching(self, function, required_prompts, steps, caches):
        key = self.cached_params(required_prompts, steps)
        for cache in caches:
            if cache[0] is not None and key == cache[0]:
                return cache[1]
        cache = caches[0]
        with devices.autocast():
            cache[1] = function(shared.sd_model, required_prompts, steps)
        cache[0] = key
        return cache[1]

    def close(self):
        if not shared.opts.persistent_cond_cache:
            StableDiffusionProcessing.cached_c = [None, None]
            StableDiffusionProcessing.cached_uc = [None, None]


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    pass


class Processed:
    def __init__(self, p, images_list, seed=-1):
        self.images = images_list
        self.prompt = p.prompt
        self.seed = seed


def _cat(conds):
    if isinstance(conds[0], dict):
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    return torch.cat(conds)


def _width(cond):
    return (cond["crossattn"] if isinstance(cond, dict) else cond).shape[1]


def process_images_inner(p):
    prompts = p.prompt if isinstance(p.prompt, list) else [p.prompt] * p.batch_size
    negatives = p.negative_prompt if isinstance(p.negative_prompt, list) else [p.negative_prompt] * len(prompts)
    if shared.state.job_count == -1:
        shared.state.job_count = p.n_iter
    model = p.sd_model
    prompts, p.extra_network_data = extra_networks.parse_prompts(prompts)
    if not p.disable_extra_networks:
        import networks  # the built-in Lora extension (the only extra network the stand-in has)

        with devices.autocast():
            networks.activate_from_prompt_params(p.extra_network_data.get("lora", []))
    uc = p.get_conds_with_caching(prompt_parser.get_learned_conditioning, negatives, p.steps, [p.cached_uc])
    c = p.get_conds_with_caching(prompt_parser.get_learned_conditioning, prompts, p.steps, [p.cached_c])
    generators = [torch.Generator().manual_seed(int(p.seed) + i) for i in range(len(prompts))]
    shape = (4, p.height // 8, p.width // 8)
    x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(devices.device)
    ac = model.alphas_cumprod.to(devices.device, torch.float32)
    timesteps = list(range(999, -1, -max(1, 1000 // p.steps)))[:p.steps]
    with torch.no_grad(), devices.autocast():
        for i, t in enumerate(timesteps):
            shared.state.sampling_step = i
            tt = torch.full((len(prompts),), t, device=x.device)
            if _width(uc) == _width(c):
                out = model.apply_model(torch.cat([x, x]), torch.cat([tt, tt]), _cat([uc, c])).float()
                out_uc, out_c = out.chunk(2)
            else:  # as the real CFGDenoiser without pad_cond_uncond: prompts of different lengths run apart
                out_uc, out_c = model.apply_model(x, tt, uc).float(), model.apply_model(x, tt, c).float()
            out = out_uc + p.cfg_scale * (out_c - out_uc)
            a, a_prev = ac[t], (ac[timesteps[i + 1]] if i + 1 < len(timesteps) else ac.new_tensor(1.0))
            if model.parameterization == "v":
                eps, x0 = (1 - a).sqrt() * x + a.sqrt() * out, a.sqrt() * x - (1 - a).sqrt() * out
            else:
                eps, x0 = out, (x - (1 - a).sqrt() * out) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        decoded = model.decode_first_stage(x.to(devices.dtype_vae))
    pixels = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    images = [Image.fromarray(np.asarray(row), "RGB") for row in pixels]
    return Processed(p, images, p.seed)


def process_images(p):
    from modules import sd_models

    sd_models.reload_model_weights()
    return process_images_inner(p)
