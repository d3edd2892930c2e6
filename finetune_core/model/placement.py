"""Device placement for the WebUI backend under `--medvram` / `--lowvram` (webui-integration.md §8).

The WebUI swaps its big modules between the CPU and the GPU with forward pre-hooks (`lowvram.send_me_to_gpu`).
Inside an autograd step a swap would move parameters the graph saved, and backward then fails with "Expected all
tensors to be on the same device". So while a step runs, `Residency` suspends those hooks, keeps every module the
step touches resident on the device, and afterwards puts each tensor back where it was and re-arms the hooks, so
generation keeps working exactly as before.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

LOWVRAM_HOOK_NAME = "send_me_to_gpu"  # the name of the WebUI's hook function (modules/lowvram.py)


def is_lowvram_hook(hook: Any) -> bool:
    """True for a forward pre-hook installed by the WebUI's `lowvram.setup_for_low_vram`."""
    return getattr(hook, "__name__", "") == LOWVRAM_HOOK_NAME


def suspend_lowvram_hooks(root: torch.nn.Module) -> Callable[[], None]:
    """Remove the lowvram pre-hooks from every module under `root`; the returned function puts them back in order."""
    saved: list[tuple[torch.nn.Module, OrderedDict]] = []
    for module in root.modules():
        hooks = module._forward_pre_hooks
        if any(is_lowvram_hook(h) for h in hooks.values()):
            saved.append((module, OrderedDict(hooks)))
            for key in [k for k, h in hooks.items() if is_lowvram_hook(h)]:
                del hooks[key]

    def restore() -> None:
        for module, hooks in saved:
            added = [(k, h) for k, h in module._forward_pre_hooks.items() if k not in hooks]
            module._forward_pre_hooks.clear()
            module._forward_pre_hooks.update(hooks)
            module._forward_pre_hooks.update(added)

    return restore


def tensor_devices(module: torch.nn.Module) -> dict[str, torch.device]:
    """Where each parameter and buffer of `module` lives now."""
    found = {name: p.device for name, p in module.named_parameters(remove_duplicate=False)}
    found.update({name: b.device for name, b in module.named_buffers(remove_duplicate=False)})
    return found


def restore_tensor_devices(module: torch.nn.Module, record: dict[str, torch.device]) -> None:
    """Move every parameter and buffer back to the device `record` saw it on (lowvram leaves a UNet split)."""
    for prefix, sub in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, param in sub._parameters.items():
            target = record.get(dot + name)
            if param is not None and target is not None and param.device != target:
                param.data = param.data.to(target)
                if param.grad is not None:
                    param.grad = param.grad.to(target)
        for name, buf in sub._buffers.items():
            target = record.get(dot + name)
            if buf is not None and target is not None and buf.device != target:
                sub._buffers[name] = buf.to(target)


class Residency:
    """Keeps the modules an autograd step uses on the device with the lowvram hooks off; re-entrant.

    modules: name -> the module the WebUI's hook moves ("unet": `sd_model.model`, "text": the text encoder the
    hook moves, "vae": `first_stage_model`). `need(name)` makes one resident for the rest of the step.
    """

    def __init__(self, sd_model: Any, modules: dict[str, torch.nn.Module], lowvram: Any, devices: Any) -> None:
        self._sd_model = sd_model
        self._modules = modules
        self._lowvram = lowvram
        self._devices = devices
        self._depth = 0
        self._resident: dict[str, dict[str, torch.device]] = {}
        self._restore_hooks: Callable[[], None] | None = None

    @property
    def managed(self) -> bool:
        """True when the WebUI manages devices with hooks (`sd_model.lowvram`), so we must place modules."""
        return bool(getattr(self._sd_model, "lowvram", False))

    @property
    def active(self) -> bool:
        return self._depth > 0 and self.managed

    def __enter__(self) -> None:  # the DiffusionModel.placement() contract yields nothing
        self._depth += 1
        if self._depth == 1 and self.managed:
            self._lowvram.send_everything_to_cpu()
            self._restore_hooks = suspend_lowvram_hooks(self._sd_model)
            logger.debug("placement: lowvram hooks suspended for the step")

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._restore_hooks is not None:
            self.release_all()
            self._restore_hooks()
            self._restore_hooks = None
            self._lowvram.module_in_gpu = None
            self._devices.torch_gc()

    def need(self, name: str) -> None:
        """Make module `name` resident until the step ends (no-op outside a managed step)."""
        if not self.active or name in self._resident:
            return
        module = self._modules[name]
        self._resident[name] = tensor_devices(module)
        module.to(self._devices.device)

    def release(self, name: str) -> None:
        """Send module `name` back where it was (used for the VAE, which no autograd graph holds)."""
        record = self._resident.pop(name, None)
        if record is None:
            return
        module = self._modules[name]
        module.to(self._devices.cpu)
        restore_tensor_devices(module, record)

    def release_all(self) -> None:
        for name in list(self._resident):
            self.release(name)
