"""The parts of a training session both backends share: which weights train, in what precision, and undoing it.

A job freezes every weight of the loaded model except the modules it trains, which become float32 master weights;
when it ends the model must be exactly as it was (values, dtypes, requires_grad, no `.grad` kept), because the
WebUI generates with the same model afterwards and the standalone app trains the next job on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch

from finetune_core.errors import ConfigError, ModelMismatchError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (module, attribute name, tensor as it was): a parameter or buffer to put back.
_Saved = tuple[torch.nn.Module, str, torch.Tensor]


def compute_dtype(precision: str, weights: torch.dtype) -> torch.dtype:
    """What a forward computes in: the asked precision, but never wider than the frozen weights (fp16 weights
    compute in fp16 whatever was asked; asking fp32 of fp16 weights would need a second, float32 copy)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    asked = PRECISIONS[precision]
    return weights if asked == torch.float32 else asked


def autocast_factory(device: torch.device, dtype: torch.dtype,
                     supported: bool = True) -> Callable[[], AbstractContextManager[Any]]:
    """The mixed-precision context of one forward: torch autocast to `dtype`, or nothing for float32 or where the
    device has no autocast (the inputs are then cast to the weights' dtype by the backend)."""
    if dtype == torch.float32 or not supported:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def select_trained(available: Mapping[str, torch.nn.Module], names: Iterable[str],
                   family: str) -> dict[str, torch.nn.Module]:
    """The modules a session trains, by name; ModelMismatchError naming any the model does not have."""
    names = list(names)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ModelMismatchError(f"this {family} model has no {', '.join(unknown)} to train")
    return {name: available[name] for name in names}


def unique_parameters(modules: Iterable[torch.nn.Module]) -> list[torch.nn.Parameter]:
    """Every parameter under `modules`, each once."""
    seen: dict[int, torch.nn.Parameter] = {}
    for module in modules:
        for param in module.parameters():
            seen.setdefault(id(param), param)
    return list(seen.values())


class WeightState:
    """Freeze everything under `roots`, make `trained` float32 masters with gradients; `restore()` undoes both.

    Values are put back through `.data` (never `load_state_dict`, which the WebUI's Lora extension hooks to drop its
    weight backups). A float32 module's original values are copied to the CPU first, since training changes them in
    place; a half module keeps its original tensors (moved to the CPU) and trains on a float32 copy.
    """

    def __init__(self, roots: Iterable[torch.nn.Module], trained: Mapping[str, torch.nn.Module]) -> None:
        self._roots = list(roots)
        self._params = unique_parameters([*self._roots, *trained.values()])
        self._flags = [p.requires_grad for p in self._params]
        self._saved: list[_Saved] = []
        try:
            for param in self._params:
                param.requires_grad_(False)
            for module in trained.values():
                self._make_master(module)
        except BaseException:
            self.restore()
            raise

    def _make_master(self, module: torch.nn.Module) -> None:
        for owner in module.modules():
            for kind in ("_parameters", "_buffers"):
                for name, tensor in getattr(owner, kind).items():
                    if tensor is None or not tensor.is_floating_point():
                        continue
                    original = tensor.data
                    kept = original.to("cpu", copy=True) if original.dtype == torch.float32 else original.to("cpu")
                    self._saved.append((owner, name, kept))
                    tensor.data = original.float()
        for param in module.parameters():
            param.requires_grad_(True)

    def restore(self) -> None:
        """Put values, dtypes, flags back and drop every `.grad` (idempotent)."""
        with torch.no_grad():
            for owner, name, kept in reversed(self._saved):
                tensor = getattr(owner, name)
                tensor.data = kept.to(tensor.device)
        self._saved.clear()
        for param, flag in zip(self._params, self._flags):
            param.grad = None
            param.requires_grad_(flag)
