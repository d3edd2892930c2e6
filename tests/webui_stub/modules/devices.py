"""Stand-in for modules/devices.py. Tests may set `device` to a fake second device (see lowvram.py)."""

from __future__ import annotations

import contextlib

import torch

cpu = torch.device("cpu")
device = torch.device("cpu")
device_interrogate = device_gfpgan = device_esrgan = device_codeformer = device
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32
dtype_inference = torch.float32
unet_needs_upcast = False
force_fp16 = False
gc_calls = []


def autocast(disable=False):
    if disable or dtype == torch.float32 or dtype_inference == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def without_autocast(disable=False):
    return contextlib.nullcontext()


def torch_gc():
    gc_calls.append(1)


def cond_cast_unet(x):
    if force_fp16:
        return x.to(torch.float16)
    return x.to(dtype_unet) if unet_needs_upcast else x


def cond_cast_float(x):
    return x.float() if unet_needs_upcast else x


def torch_npu_set_device():
    pass
