"""Stand-in for modules/devices.py. Tests may set `device` to a fake second device (see lowvram.py).

`autocast()` follows the real decision tree: nothing for float32, the WebUI's "manual cast" (patching the forward of
Linear/Conv2d/GroupNorm/LayerNorm/MultiheadAttention to cast each layer's weights to the target dtype and back) on
MPS, XPU and GTX 16xx cards (`manual_cast_device = True` here), else torch autocast. On a CPU-only test machine the
CUDA autocast is stood in by CPU bf16 autocast.
"""

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
fp8 = False
manual_cast_device = False  # test aid: behave like an MPS / XPU / GTX 16xx machine
gc_calls = []

patch_module_list = [torch.nn.Linear, torch.nn.Conv2d, torch.nn.MultiheadAttention, torch.nn.GroupNorm,
                     torch.nn.LayerNorm]


def has_mps():
    return False


def has_xpu():
    return False


def cuda_no_autocast(device_id=None):
    return manual_cast_device


def manual_cast_forward(target_dtype):
    def forward_wrapper(self, *args, **kwargs):
        if any(isinstance(arg, torch.Tensor) and arg.dtype != target_dtype for arg in args):
            args = [arg.to(target_dtype) if isinstance(arg, torch.Tensor) else arg for arg in args]
            kwargs = {k: v.to(target_dtype) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        org_dtype = target_dtype
        for param in self.parameters():
            if param.dtype != target_dtype:
                org_dtype = param.dtype
                break
        if org_dtype != target_dtype:
            self.to(target_dtype)
        result = self.org_forward(*args, **kwargs)
        if org_dtype != target_dtype:
            self.to(org_dtype)
        if target_dtype != dtype_inference:
            if isinstance(result, tuple):
                result = tuple(i.to(dtype_inference) if isinstance(i, torch.Tensor) else i for i in result)
            elif isinstance(result, torch.Tensor):
                result = result.to(dtype_inference)
        return result
    return forward_wrapper


@contextlib.contextmanager
def manual_cast(target_dtype):
    applied = False
    for module_type in patch_module_list:
        if hasattr(module_type, "org_forward"):
            continue
        applied = True
        org_forward = module_type.forward
        if module_type == torch.nn.MultiheadAttention:
            module_type.forward = manual_cast_forward(torch.float32)
        else:
            module_type.forward = manual_cast_forward(target_dtype)
        module_type.org_forward = org_forward
    try:
        yield None
    finally:
        if applied:
            for module_type in patch_module_list:
                if hasattr(module_type, "org_forward"):
                    module_type.forward = module_type.org_forward
                    delattr(module_type, "org_forward")


def autocast(disable=False):
    if disable or force_fp16:
        return contextlib.nullcontext()
    if fp8 and device == cpu:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=True)
    if dtype == torch.float32 or dtype_inference == torch.float32:
        return contextlib.nullcontext()
    if has_xpu() or has_mps() or cuda_no_autocast():
        return manual_cast(dtype)
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda")
    return torch.autocast("cpu", dtype=torch.bfloat16)  # test aid: CUDA's fp16 autocast on a CPU-only machine


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
