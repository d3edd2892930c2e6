"""Previews and class images inside the WebUI, made by the WebUI's own txt2img (its samplers, its conditioning,
its VAE handling), as the built-in trainers make their previews. Imports the WebUI's `modules` lazily."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from finetune_core.errors import ConfigError
from finetune_core.model.interface import SampleRequest


def sampler_names() -> list[str]:
    """The WebUI's sampler names ("DPM++ 2M", "Euler a", "DDIM", ...)."""
    from modules import sd_samplers

    return [s.name for s in sd_samplers.all_samplers]


def txt2img(sd_model: Any, request: SampleRequest) -> list[Any]:
    """Images for `request` from the WebUI's txt2img, without saving anything and without reloading the model.

    `process_images_inner` rather than `process_images`: the latter first calls `reload_model_weights()`, which would
    swap the model under a running job when the checkpoint dropdown changed meanwhile.
    """
    from modules import processing, sd_samplers, shared

    names = sampler_names()
    if request.sampler not in names:
        raise ConfigError(f"the sampler {request.sampler!r} is not one of the WebUI's: {', '.join(names)}")
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=sd_model, prompt=list(request.prompts), negative_prompt=list(request.negative_prompts),
        batch_size=len(request.prompts), steps=request.steps, sampler_name=request.sampler,
        cfg_scale=request.cfg_scale, width=request.width, height=request.height, seed=request.seed,
        do_not_save_grid=True, do_not_save_samples=True, do_not_reload_embeddings=True)
    p.disable_extra_networks = True  # the trained state is applied by the caller, not by <lora:...> in a prompt
    fix = getattr(sd_samplers, "fix_p_invalid_sampler_and_scheduler", None)
    if fix is not None:
        fix(p)
    state = shared.state
    job = state.job_count, state.job_no
    # counted as a generation of its own (a training job's step counts would inflate the console's "Total
    # progress"), and that bar closed afterwards, as the WebUI's own txt2img does
    state.job_count, state.job_no = -1, 0
    with fresh_conditioning(processing):
        try:
            processed = processing.process_images_inner(p)
        finally:
            p.close()
            if getattr(shared, "total_tqdm", None) is not None:
                shared.total_tqdm.clear()
            state.job_count, state.job_no = job
    return list(processed.images[:len(request.prompts)])


@contextmanager
def fresh_conditioning(processing: Any) -> Iterator[None]:
    """The WebUI caches prompt conditioning across generations (`persistent_cond_cache`), keyed by the prompt but
    not by the embeddings' values: a preview would reuse the previous step's vectors, and a later generation ours."""
    owner = processing.StableDiffusionProcessing
    owner.cached_c, owner.cached_uc = [None, None], [None, None]
    try:
        yield
    finally:
        owner.cached_c, owner.cached_uc = [None, None], [None, None]
