"""The network the LoRA method trains: one module per adapted layer, of any registered network type
(`formats.networks`), with the type's tensors as parameters.

A module's output change is the type's own shortcut where it has one (LoRA: up(dropout(down(x))) * scale, as kohya's
LoRAModule), else the layer's operation on the type's weight change, finished as the WebUI finishes it (scale, DoRA,
multiplier): linear / conv2d / group_norm / layer_norm of the input with the change as weight (the WebUI's
`NetworkModule.forward`), which equals merging the change into the weight.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional

from finetune_core.formats.lora_file import ALPHA, NetworkModule
from finetune_core.formats.networks import (
    CONV,
    DORA,
    LINEAR,
    NETWORK_TYPES,
    NORM,
    Dropouts,
    Layer,
    NetworkType,
    finalize,
)
from finetune_core.model.interface import AdapterTarget


def layer_of(target: AdapterTarget) -> Layer:
    """The maths' view of a model layer."""
    kind = {"norm": NORM, "conv": CONV}.get(target.kind, LINEAR)
    return Layer(target.name, kind, target.in_features, target.out_features, target.kernel_size, target.stride,
                 target.padding)


def _autocast_on(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))  # torch >= 2.4
    except TypeError:  # the WebUI's torch 2.1
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _key(part: str) -> str:
    return part.replace(".", "__")  # a ParameterDict key cannot hold "."


class NetworkAdapter(nn.Module):
    """One layer's module; a `WeightAdapter` for `DiffusionModel.weight_adapters`."""

    def __init__(self, target: AdapterTarget, kind: NetworkType, tensors: Mapping[str, torch.Tensor],
                 dropouts: Dropouts | None = None, module_dropout: float = 0.0) -> None:
        super().__init__()
        self.target, self.kind, self.layer = target, kind, layer_of(target)
        trained = {p: t for p, t in tensors.items() if p != ALPHA and p not in kind.fixed}
        self.weights = nn.ParameterDict({_key(p): nn.Parameter(t.detach().float().clone()) for p, t in trained.items()})
        for part in kind.fixed:
            self.register_buffer(_key(part), tensors[part].detach().clone())
        alpha = tensors.get(ALPHA)
        self.alpha = None if alpha is None else float(alpha.item())
        self.dropouts, self.module_dropout = dropouts or Dropouts(), module_dropout
        self.multiplier = 1.0

    def tensors(self) -> dict[str, torch.Tensor]:
        """The type's tensors by key part (alpha as a 0-d tensor), as the maths and the file take them."""
        found = {p.replace("__", "."): t for p, t in self.weights.items()}
        found.update({p: getattr(self, _key(p)) for p in self.kind.fixed})
        if self.alpha is not None:
            found[ALPHA] = torch.tensor(self.alpha)
        return found

    @property
    def rank(self) -> int | None:
        return self.kind.dim(self.tensors())

    @property
    def scale(self) -> float:
        return self.kind.scale(self.tensors(), self.alpha)

    @property
    def dora(self) -> bool:
        return _key(DORA) in self.weights

    def _dropped(self) -> bool:
        return self.training and bool(self.module_dropout) and float(torch.rand(1)) < self.module_dropout

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The change of the layer's output for input `x` (0-d zero when the module is dropped this step)."""
        if self._dropped():
            return x.new_zeros(())
        if not _autocast_on(x.device.type):
            x = x.to(torch.float32)
        tensors = self.tensors()
        if not self.dora:
            out = self.kind.forward(tensors, x, self.layer, self.scale * self.multiplier,
                                    self.dropouts if self.training else None)
            if out is not None:
                return out
        delta, bias = self._change(tensors, weight)
        if self.layer.kind == CONV:
            return functional.conv2d(x, delta, bias, stride=self.target.stride, padding=self.target.padding)
        if self.layer.kind == NORM and self.target.norm_groups > 0:
            return functional.group_norm(x, self.target.norm_groups, delta, bias, self.target.norm_eps)
        if self.layer.kind == NORM:
            return functional.layer_norm(x, (self.target.out_features,), delta, bias, self.target.norm_eps)
        return functional.linear(x, delta, bias)

    def _change(self, tensors: Mapping[str, torch.Tensor],
                weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = weight.detach().float()
        updown, bias = self.kind.updown(tensors, base)
        delta = finalize(updown, base, self.scale, tensors.get(DORA), self.multiplier)
        return delta, None if bias is None else bias * self.multiplier

    def weight_delta(self, weight: torch.Tensor) -> torch.Tensor:
        """The change of `weight` (for fused weights): the whole-module dropout applies, the others cannot."""
        if self._dropped():
            return torch.zeros_like(weight, dtype=torch.float32)
        return self._change(self.tensors(), weight)[0]

    def as_module(self) -> NetworkModule:
        """The file form of this module (float32, CPU)."""
        return NetworkModule(self.kind.name, {p: t.detach().float().cpu().clone() if t.is_floating_point()
                                              else t.detach().cpu().clone() for p, t in self.tensors().items()})


class LoraNetwork(nn.Module):
    """The modules by kohya name (`adapters`); the multiplier applies to all of them."""

    def __init__(self, adapters: Mapping[str, NetworkAdapter]) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict(dict(adapters))

    def by_name(self) -> dict[str, NetworkAdapter]:
        return {name: adapter for name, adapter in self.adapters.items()}  # type: ignore[misc]

    def modules_for_file(self) -> dict[str, NetworkModule]:
        return {name: adapter.as_module() for name, adapter in self.by_name().items()}

    def kinds(self) -> list[NetworkType]:
        """The types in the network, in registry order."""
        found = {adapter.kind.name for adapter in self.by_name().values()}
        return [kind for name, kind in NETWORK_TYPES.items() if name in found]
