"""A training session on the WebUI's loaded model (webui-integration.md §4, §8): what a job must set aside from
the last generation, the gradient checkpointing it adds, and the precision it computes in. Everything is undone
when the job ends. Imports the WebUI's `modules` lazily.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from finetune_core.errors import ModelMismatchError

# The UNet blocks the WebUI's own `sd_hijack_checkpoint` checkpoints (ldm and sgm use the same class names).
CHECKPOINTED_BLOCKS = ("ResBlock", "BasicTransformerBlock", "AttentionBlock")
# The VAE decoder's blocks (ldm and sgm `diffusionmodules.model`; the WebUI swaps AttnBlock's forward at class level,
# which the instance wrapper calls through).
VAE_CHECKPOINTED_BLOCKS = ("ResnetBlock", "AttnBlock", "MemoryEfficientAttnBlock")
_FP8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))


def refuse_untrainable(sd_model: Any) -> None:
    """A replaced UNet (Settings → SD Unet, e.g. TensorRT) or FP8 weights cannot train: say what to change."""
    from modules import devices

    try:
        from modules import sd_unet
    except ImportError:  # a WebUI without SD Unet support
        sd_unet = None
    current = getattr(sd_unet, "current_unet", None)
    if current is not None:
        label = getattr(getattr(current, "option", None), "label", type(current).__name__)
        raise ModelMismatchError(f"The UNet is replaced by '{label}' (Settings → Stable Diffusion → SD Unet), which "
                                 "cannot train; set SD Unet to None, then start training again.")
    unet_dtype = next(sd_model.model.diffusion_model.parameters()).dtype
    if getattr(devices, "fp8", False) or unet_dtype in _FP8:
        raise ModelMismatchError("The loaded model's weights are stored in FP8 (Settings → Optimizations → FP8 "
                                 "weight), which cannot train; set FP8 weight to Disable, then start training again.")


@contextmanager
def generation_state_set_aside(sd_model: Any) -> Iterator[None]:
    """Train on the plain checkpoint: no hypernetwork or LoRA the last generation left applied.

    `shared.loaded_hypernetworks` stays filled after a generation with `<hypernet:...>`. The built-in Lora extension
    merges LoRAs into the weights on first use and keeps them merged (`network_current_names`) until a generation
    asks for others; here the merged layers are put back from its own backups and its `loaded_networks` list is
    emptied, so nothing re-merges during training. Afterwards the lists come back and the layers stay unmerged with
    their backups, so the next generation merges exactly what it asks for, as the extension always does.
    """
    from modules import shared

    saved_hypernetworks = shared.loaded_hypernetworks
    shared.loaded_hypernetworks = []
    lora: Any = sys.modules.get("networks")  # the built-in Lora extension's module, when it is loaded
    networks = getattr(lora, "loaded_networks", None)
    saved_networks = list(networks) if isinstance(networks, list) else None
    if isinstance(networks, list):
        networks.clear()
        unmerge_networks(sd_model, lora)
    try:
        yield
    finally:
        shared.loaded_hypernetworks = saved_hypernetworks
        if isinstance(networks, list) and saved_networks is not None:
            networks[:] = saved_networks  # in place: the extension refers to this very list


def unmerge_networks(sd_model: Any, lora: Any) -> int:
    """Restore every layer the Lora extension merged networks into; returns how many there were."""
    restore = getattr(lora, "network_restore_weights_from_backup", None)
    count = 0
    for module in sd_model.modules():
        if getattr(module, "network_current_names", ()) and restore is not None:
            with torch.no_grad():
                restore(module)
            module.network_current_names = ()
            count += 1
    return count


@contextmanager
def checkpointed_blocks(unet: torch.nn.Module, names: tuple[str, ...] = CHECKPOINTED_BLOCKS) -> Iterator[int]:
    """Gradient checkpointing on the UNet's residual and transformer blocks (or the classes `names`), by instance,
    undone on exit.

    Why not the WebUI's `sd_hijack_checkpoint`: it patches only ldm's classes (not sgm's, so not SDXL) and uses
    reentrant checkpointing, whose outputs need an input that requires grad; with the UNet frozen a hypernetwork's
    first blocks would then get no gradient. Non-reentrant checkpointing has neither limit.
    """
    wrapped = [m for m in unet.modules() if type(m).__name__ in names and "forward" not in vars(m)]
    for module in wrapped:
        module.forward = _checkpointed(module.forward)
    try:
        yield len(wrapped)
    finally:
        for module in wrapped:
            del module.forward


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    from torch.utils.checkpoint import checkpoint

    def call(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return call


def autocast_supported(devices: Any, dtype: torch.dtype) -> bool:
    """Whether torch autocast can run `dtype` here. The WebUI casts by hand ("manual cast") on MPS, XPU and GTX 16xx
    cards; that would cast float32 trained layers down and back, so a job runs those without autocast instead."""
    device = torch.device(devices.device)
    if device.type == "cuda":
        no_autocast = getattr(devices, "cuda_no_autocast", None)
        return not (no_autocast is not None and no_autocast())
    return device.type == "cpu" and dtype == torch.bfloat16


@contextmanager
def job_autocast(devices: Any, factory: Callable[[], AbstractContextManager[Any]]) -> Iterator[None]:
    """Every `devices.autocast()` during the job (ours and the WebUI's own sampling code) gives the job's autocast,
    never the WebUI's manual cast, which would round float32 trained weights to half precision."""
    original = devices.autocast

    def autocast(disable: bool = False) -> AbstractContextManager[Any]:
        return nullcontext() if disable else factory()

    devices.autocast = autocast
    try:
        yield
    finally:
        devices.autocast = original
