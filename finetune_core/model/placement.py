"""Device placement for the WebUI backend under `--medvram` / `--lowvram` (webui-integration.md §8).

The WebUI swaps its big modules between the CPU and the GPU with forward pre-hooks (`lowvram.send_me_to_gpu`).
Inside an autograd step a swap would move parameters the graph saved, and backward then fails with "Expected all
tensors to be on the same device". So while a phase of a job runs (all its steps: the queue lock is held anyway),
`Residency` suspends those hooks and keeps every module the steps touch resident on the device; previews and class
images run `paused()`, with the hooks working as in any generation; at the end each tensor goes back where it was
and the hooks are re-armed, so generation keeps working exactly as before. Modules move once per phase, not once
per step.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    """Keeps the modules autograd uses on the device with the lowvram hooks off; re-entrant.

    modules: name -> the module the WebUI's hook moves ("unet": `sd_model.model`, "text": the text encoder the
    hook moves, "vae": `first_stage_model`). `need(name)` makes one resident until the residency ends;
    `release(name)` sends it back early unless it was pinned (`need(name, pin=True)`: a graph holds its weights).
    """

    def __init__(self, sd_model: Any, modules: dict[str, torch.nn.Module], lowvram: Any, devices: Any) -> None:
        self._sd_model = sd_model
        self._modules = modules
        self._lowvram = lowvram
        self._devices = devices
        self._depth = 0
        self._resident: dict[str, dict[str, torch.device]] = {}
        self._pinned: set[str] = set()
        self._restore_hooks: Callable[[], None] | None = None

    @property
    def managed(self) -> bool:
        """True when the WebUI manages devices with hooks (`sd_model.lowvram`), so we must place modules."""
        return bool(getattr(self._sd_model, "lowvram", False))

    @property
    def active(self) -> bool:
        return self._depth > 0 and self._restore_hooks is not None

    def __enter__(self) -> None:  # the DiffusionModel.placement() contract yields nothing
        self._depth += 1
        if self._depth == 1 and self.managed:
            self._suspend()

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._restore_hooks is not None:
            self._resume_hooks()
            self._pinned.clear()

    def _suspend(self) -> None:
        self._lowvram.send_everything_to_cpu()
        self._restore_hooks = suspend_lowvram_hooks(self._sd_model)
        logger.debug("placement: lowvram hooks suspended")

    def _resume_hooks(self) -> None:
        self.release_all(force=True)
        if self._restore_hooks is not None:
            self._restore_hooks()
        self._restore_hooks = None
        self._lowvram.module_in_gpu = None
        self._devices.torch_gc()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Generation inside a phase (previews, class images): resident modules go back and the WebUI's hooks move
        modules as in any generation; afterwards the same modules are made resident again."""
        if not self.active:
            yield
            return
        names, pinned = list(self._resident), set(self._pinned)
        self._resume_hooks()
        try:
            yield
        finally:
            self._suspend()
            for name in names:
                self.need(name, pin=name in pinned)

    def need(self, name: str, pin: bool = False) -> None:
        """Make module `name` resident until the residency ends (no-op outside a managed residency)."""
        if not self.active:
            return
        if pin:
            self._pinned.add(name)
        if name in self._resident:
            return
        module = self._modules[name]
        self._resident[name] = tensor_devices(module)
        module.to(self._devices.device)

    def release(self, name: str, force: bool = False) -> None:
        """Send module `name` back where it was (the VAE after a decode without gradients); pinned ones stay."""
        if name in self._pinned and not force:
            return
        record = self._resident.pop(name, None)
        if record is None:
            return
        module = self._modules[name]
        module.to(self._devices.cpu)
        restore_tensor_devices(module, record)

    def release_all(self, force: bool = False) -> None:
        for name in list(self._resident):
            self.release(name, force)
