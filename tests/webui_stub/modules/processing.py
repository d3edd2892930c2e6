"""Stand-in for modules/processing.py: txt2img (and img2img, sampled from noise) as far as a trainer's previews and
an AlwaysVisible script meet it.

Kept from the real one: the class-level conditioning caches (`cached_c` / `cached_uc`, shared by every instance,
keyed by `cached_params` (the prompts and settings but not embedding values or scripts), cleared by `close()` only
without `persistent_cond_cache`), `setup_conds` computing both through `get_conds_with_caching` with the real
signatures, conditioning through `prompt_parser` and the hijacked text encoders, the scripts' hooks in the real
order (`before_process` in `process_images`; `process` before the batch loop; `before_process_batch`,
`process_batch` before `setup_conds`; `postprocess_batch`; `postprocess` at the end), `extra_generation_params`
in the infotext (`create_infotext` joins `key: quote(value)`), `<lora:...>` tags cut from the prompts after
`before_process_batch` and handed to the Lora extension (unless `disable_extra_networks`; with no tag it is called
with none, which unloads the last generation's), sampling through `sd_model.apply_model` (so the
lowvram hooks move the UNet in) and decoding through `decode_first_stage` (the lowvram VAE wrapper), everything
under `torch.no_grad()` and `devices.autocast()`, and `shared.state` bookkeeping. The sampler itself is a plain
deterministic DDIM, whatever name is asked for.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from modules import devices, extra_networks, infotext_utils, prompt_parser, shared


class StableDiffusionProcessing:
    cached_uc = [None, None]
    cached_c = [None, None]

    def __init__(self, sd_model=None, prompt="", negative_prompt="", batch_size=1, n_iter=1, steps=50,
                 sampler_name=None, scheduler=None, cfg_scale=7.0, width=512, height=512, seed=-1,
                 do_not_save_grid=False, do_not_save_samples=False, do_not_reload_embeddings=False,
                 extra_generation_params=None, script_args=None, **kwargs):
        self.sd_model = sd_model
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.batch_size, self.n_iter, self.steps = batch_size, n_iter, steps
        self.sampler_name, self.scheduler, self.cfg_scale = sampler_name, scheduler, cfg_scale
        self.width, self.height, self.seed = width, height, seed
        self.do_not_save_grid, self.do_not_save_samples = do_not_save_grid, do_not_save_samples
        self.do_not_reload_embeddings = do_not_reload_embeddings
        self.disable_extra_networks = False
        self.scripts = None
        self.script_args = script_args or []
        self.extra_generation_params = extra_generation_params or {}
        self.extra_network_data = {}
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c
        self.c = self.uc = None

    def cached_params(self, required_prompts, steps, extra_network_data, hires_steps=None, use_old_scheduling=False):
        return (tuple(required_prompts), steps, hires_steps, use_old_scheduling, shared.opts.CLIP_stop_at_last_layers,
                shared.sd_model.sd_checkpoint_info, extra_network_data, self.width, self.height,
                shared.opts.emphasis)

    def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data,
                               hires_steps=None):
        key = self.cached_params(required_prompts, steps, extra_network_data, hires_steps, False)
        for cache in caches:
            if cache[0] is not None and key == cache[0]:
                return cache[1]
        cache = caches[0]
        with devices.autocast():
            cache[1] = function(shared.sd_model, required_prompts, steps, hires_steps, False)
        cache[0] = key
        return cache[1]

    def setup_conds(self):
        self.uc = self.get_conds_with_caching(prompt_parser.get_learned_conditioning, self.negative_prompts,
                                              self.steps, [self.cached_uc], self.extra_network_data)
        self.c = self.get_conds_with_caching(prompt_parser.get_learned_conditioning, self.prompts, self.steps,
                                             [self.cached_c], self.extra_network_data)

    def close(self):
        self.c = self.uc = None
        if not shared.opts.persistent_cond_cache:
            StableDiffusionProcessing.cached_c = [None, None]
            StableDiffusionProcessing.cached_uc = [None, None]


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    pass


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    """img2img as far as scripts and conditioning meet it (the stand-in samples from noise, not the init image)."""

    def __init__(self, init_images=None, denoising_strength=0.75, **kwargs):
        super().__init__(**kwargs)
        self.init_images = init_images or []
        self.denoising_strength = denoising_strength


class Processed:
    def __init__(self, p, images_list, seed=-1, infotexts=None):
        self.images = images_list
        self.prompt = p.prompt
        self.seed = seed
        self.infotexts = infotexts or []
        self.info = self.infotexts[0] if self.infotexts else ""


def create_infotext(p, index=0):
    """The real create_infotext's shape: prompt, negative prompt, then `key: quote(value)` pairs."""
    params = {"Steps": p.steps, "Sampler": p.sampler_name, "CFG scale": p.cfg_scale, "Seed": int(p.seed) + index,
              "Size": f"{p.width}x{p.height}", "Model hash": getattr(shared.sd_model, "sd_model_hash", None),
              **p.extra_generation_params}
    text = ", ".join(k if k == v else f"{k}: {infotext_utils.quote(v)}" for k, v in params.items() if v is not None)
    negative = p.negative_prompts[index] if p.negative_prompts[index] else ""
    return f"{p.prompts[index]}" + (f"\nNegative prompt: {negative}" if negative else "") + f"\n{text}"


def _cat(conds):
    if isinstance(conds[0], dict):
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    return torch.cat(conds)


def _width(cond):
    return (cond["crossattn"] if isinstance(cond, dict) else cond).shape[1]


def process_images_inner(p):
    p.prompts = p.prompt if isinstance(p.prompt, list) else [p.prompt] * p.batch_size
    p.negative_prompts = (p.negative_prompt if isinstance(p.negative_prompt, list)
                          else [p.negative_prompt] * len(p.prompts))
    if shared.state.job_count == -1:
        shared.state.job_count = p.n_iter
    if p.scripts is not None:
        p.scripts.process(p)
    with torch.no_grad():
        if p.scripts is not None:
            p.scripts.before_process_batch(p, batch_number=0, prompts=p.prompts, seeds=[p.seed])
        _activate_extra_networks(p)
        if p.scripts is not None:
            p.scripts.process_batch(p, batch_number=0, prompts=p.prompts, seeds=[p.seed])
        p.setup_conds()
        images = _sample(p, p.sd_model, p.c, p.uc)
        if p.scripts is not None:
            p.scripts.postprocess_batch(p, images=images, batch_number=0)
    processed = Processed(p, images, p.seed, [create_infotext(p, i) for i in range(len(images))])
    if p.scripts is not None:
        p.scripts.postprocess(p, processed)
    return processed


def _activate_extra_networks(p):
    p.prompts, p.extra_network_data = extra_networks.parse_prompts(p.prompts)
    if not p.disable_extra_networks:
        import networks  # the built-in Lora extension (the only extra network the stand-in has)

        with devices.autocast():
            networks.activate_from_prompt_params(p.extra_network_data.get("lora", []))


def _sample(p, model, c, uc):
    generators = [torch.Generator().manual_seed(int(p.seed) + i) for i in range(len(p.prompts))]
    shape = (4, p.height // 8, p.width // 8)
    x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(devices.device)
    ac = model.alphas_cumprod.to(devices.device, torch.float32)
    timesteps = list(range(999, -1, -max(1, 1000 // p.steps)))[:p.steps]
    shared.state.sampling_steps = len(timesteps)
    with devices.autocast():
        for i, t in enumerate(timesteps):
            shared.state.sampling_step = i
            shared.total_tqdm.update()  # the sampler's per-step callback (sd_samplers_common.callback_state)
            tt = torch.full((len(p.prompts),), t, device=x.device)
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
    return [Image.fromarray(np.asarray(row), "RGB") for row in pixels]


def process_images(p):
    from modules import sd_models

    if p.scripts is not None:
        p.scripts.before_process(p)
    sd_models.reload_model_weights()
    return process_images_inner(p)
