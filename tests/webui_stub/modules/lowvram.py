"""Stand-in for modules/lowvram.py: forward pre-hooks that swap the big modules between the CPU and the device.

Test aids: `hook_calls` records every hook firing; `location` records where each hooked module was last sent
("device" or "cpu"), tracked through the modules' own `.to` so it also sees moves made by other code. On a CPU-only
machine `devices.device` and `devices.cpu` are distinct `torch.device("cpu")` objects and are told apart by identity.
"""

from __future__ import annotations

import torch

from modules import devices, shared

module_in_gpu = None
cpu = torch.device("cpu")
hook_calls: list[str] = []
location: dict[str, str] = {}
moves: list[tuple[str, str]] = []  # test aid: every (module, "device"/"cpu") move of a hooked module


def send_everything_to_cpu():
    global module_in_gpu
    if module_in_gpu is not None:
        module_in_gpu.to(cpu)
    module_in_gpu = None


def is_needed(sd_model):
    opts = shared.cmd_opts
    return opts.lowvram or opts.medvram or (opts.medvram_sdxl and hasattr(sd_model, "conditioner"))


def apply(sd_model):
    enable = is_needed(sd_model)
    shared.parallel_processing_allowed = not enable
    if enable:
        setup_for_low_vram(sd_model, not shared.cmd_opts.lowvram)
    else:
        sd_model.lowvram = False


def is_enabled(sd_model):
    return sd_model.lowvram


def _track(module, name):
    """Record where `module` is sent by any `.to(...)` call (test aid, not in the WebUI)."""
    original_to = module.to

    def to(*args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, (torch.device, str)):
            is_device = target is devices.device or (isinstance(target, torch.device) and target.type != "cpu")
            location[name] = "device" if is_device else "cpu"
            moves.append((name, location[name]))
        return original_to(*args, **kwargs)

    module.to = to
    location[name] = "cpu"


def setup_for_low_vram(sd_model, use_medvram):
    if getattr(sd_model, "lowvram", False):
        return
    sd_model.lowvram = True
    parents = {}
    names = {}

    def send_me_to_gpu(module, _):
        global module_in_gpu
        module = parents.get(module, module)
        hook_calls.append(names.get(module, type(module).__name__))
        if module_in_gpu is module:
            return
        if module_in_gpu is not None:
            module_in_gpu.to(cpu)
        module.to(devices.device)
        module_in_gpu = module

    vae = sd_model.first_stage_model
    vae_encode, vae_decode = vae.encode, vae.decode

    def first_stage_model_encode_wrap(x):
        send_me_to_gpu(vae, None)
        return vae_encode(x)

    def first_stage_model_decode_wrap(z):
        send_me_to_gpu(vae, None)
        return vae_decode(z)

    is_sdxl = hasattr(sd_model, "conditioner")
    is_sd2 = not is_sdxl and hasattr(sd_model.cond_stage_model, "model")
    if is_sdxl:
        text_hooked = [sd_model.conditioner]
        text_parent = sd_model.conditioner
    elif is_sd2:  # the CLIP model's forward never runs; the token embedding's does
        text_hooked = [sd_model.cond_stage_model.model, sd_model.cond_stage_model.model.token_embedding]
        text_parent = sd_model.cond_stage_model
    else:
        text_hooked = [sd_model.cond_stage_model.transformer]
        text_parent = sd_model.cond_stage_model
    # As in the WebUI: detach the big modules, send the rest of the model to the device, re-attach them on the CPU.
    big = _detach(sd_model)
    sd_model.to(devices.device)
    _attach(sd_model, big)
    for module, name in ((text_parent, "text"), (vae, "vae"), (sd_model.model, "unet")):
        names[module] = name
        _track(module, name)
        module.to(cpu)
    for text in text_hooked:
        text.register_forward_pre_hook(send_me_to_gpu)
        parents[text] = text_parent
    vae.register_forward_pre_hook(send_me_to_gpu)
    vae.encode = first_stage_model_encode_wrap
    vae.decode = first_stage_model_decode_wrap
    if use_medvram:
        sd_model.model.register_forward_pre_hook(send_me_to_gpu)
    else:
        unet = sd_model.model.diffusion_model
        stored = unet.input_blocks, unet.middle_block, unet.output_blocks, unet.time_embed
        unet.input_blocks, unet.middle_block, unet.output_blocks, unet.time_embed = None, None, None, None
        sd_model.model.to(devices.device)
        unet.input_blocks, unet.middle_block, unet.output_blocks, unet.time_embed = stored
        for block in [unet.time_embed, *unet.input_blocks, unet.middle_block, *unet.output_blocks]:
            names[block] = "unet-block"
            block.register_forward_pre_hook(send_me_to_gpu)


def _detach(sd_model):
    if hasattr(sd_model, "conditioner"):
        text_owner, text_attr = sd_model, "conditioner"
    elif hasattr(sd_model.cond_stage_model, "model"):
        text_owner, text_attr = sd_model.cond_stage_model, "model"
    else:
        text_owner, text_attr = sd_model.cond_stage_model, "transformer"
    stored = (text_owner, text_attr, getattr(text_owner, text_attr), sd_model.first_stage_model, sd_model.model)
    setattr(text_owner, text_attr, None)
    sd_model.first_stage_model, sd_model.model = None, None
    return stored


def _attach(sd_model, stored):
    text_owner, text_attr, text, vae, unet = stored
    setattr(text_owner, text_attr, text)
    sd_model.first_stage_model, sd_model.model = vae, unet
