"""The LoRA network: one low-rank adapter per target layer, as kohya's `networks.lora.LoRAModule` (lora.md §2).

down: Linear(in, r) or Conv2d(in, r, the target's kernel/stride/padding); up: Linear(r, out) or a 1x1 Conv2d;
kohya's init (down kaiming-uniform with a = sqrt(5), up zero, so step 0 is the base model exactly);
output change = up(dropout(down(x))) * multiplier * alpha / r.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional

from finetune_core.formats.lora_file import LoraModule
from finetune_core.model.interface import AdapterTarget


@torch.no_grad()
def kohya_init(down: torch.Tensor, up: torch.Tensor, generator: torch.Generator) -> None:
    """kaiming_uniform_(down, a=sqrt(5)) drawn from `generator` (torch's init takes none in torch 2.1), up = 0."""
    fan_in = down[0].numel()
    bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))  # gain sqrt(2 / (1 + a^2)) with a^2 = 5, times sqrt(3 / fan_in)
    down.copy_(torch.rand(down.shape, generator=generator) * 2 * bound - bound)
    up.zero_()


def _autocast_on(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))  # torch >= 2.4
    except TypeError:  # the WebUI's torch 2.1
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


class LoraAdapter(nn.Module):
    """One layer's adapter; a `WeightAdapter` for `DiffusionModel.weight_adapters`."""

    def __init__(self, target: AdapterTarget, rank: int, alpha: float | None, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0) -> None:
        super().__init__()
        self.target = target
        kernel = target.kernel_size
        down_shape = (rank, target.in_features, *kernel) if kernel else (rank, target.in_features)
        up_shape = (target.out_features, rank, 1, 1) if kernel else (target.out_features, rank)
        self.down = nn.Parameter(torch.zeros(down_shape))
        self.up = nn.Parameter(torch.zeros(up_shape))
        self.alpha = float(rank if not alpha else alpha)  # kohya: alpha None or 0 means alpha = rank
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.multiplier = 1.0

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The change of the layer's output for input `x` (0-d zero when the module is dropped this step)."""
        if self.training and self.module_dropout and float(torch.rand(1)) < self.module_dropout:
            return x.new_zeros(())
        if not _autocast_on(x.device.type):
            x = x.to(self.down.dtype)
        kernel = self.target.kernel_size
        if kernel:
            hidden = functional.conv2d(x, self.down, stride=self.target.stride, padding=self.target.padding)
        else:
            hidden = functional.linear(x, self.down)
        scale = self.scale * self.multiplier
        if self.training and self.dropout:
            hidden = functional.dropout(hidden, p=self.dropout)
        if self.training and self.rank_dropout:
            mask = torch.rand((hidden.shape[0], self.rank), device=hidden.device) > self.rank_dropout
            shape: tuple[int, ...] = (hidden.shape[0], self.rank, 1, 1)
            if not kernel:  # the rank is the last dimension: (B, r) or (B, tokens, r)
                shape = (hidden.shape[0], *([1] * (hidden.dim() - 2)), self.rank)
            hidden = hidden * mask.reshape(shape).to(hidden.dtype)
            scale /= 1.0 - self.rank_dropout  # as kohya: treated as if the rank were smaller
        out = functional.conv2d(hidden, self.up) if kernel else functional.linear(hidden, self.up)
        return out * scale

    def weight_delta(self) -> torch.Tensor:
        """multiplier * scale * up @ down in the target weight's shape (for fused weights; the whole-module and
        per-rank dropouts apply, the per-value dropout of `forward` cannot)."""
        if self.training and self.module_dropout and float(torch.rand(1)) < self.module_dropout:
            return torch.zeros(self.up.shape[0], *self.down.shape[1:], device=self.down.device)
        up, scale = self.up.flatten(1), self.scale * self.multiplier
        if self.training and self.rank_dropout:
            mask = torch.rand(self.rank, device=up.device) > self.rank_dropout
            up, scale = up * mask.to(up.dtype), scale / (1.0 - self.rank_dropout)
        return (up @ self.down.flatten(1)).reshape(self.up.shape[0], *self.down.shape[1:]) * scale

    def as_module(self) -> LoraModule:
        """The file form of this adapter (float32, CPU)."""
        return LoraModule(self.down.detach().float().cpu().clone(), self.up.detach().float().cpu().clone(),
                          self.alpha)


class LoraNetwork(nn.Module):
    """The adapters by kohya name (`adapters`); the multiplier applies to all of them."""

    def __init__(self, adapters: Mapping[str, LoraAdapter]) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict(dict(adapters))

    def by_name(self) -> dict[str, LoraAdapter]:
        return {name: adapter for name, adapter in self.adapters.items()}  # type: ignore[misc]

    def modules_for_file(self) -> dict[str, LoraModule]:
        return {name: adapter.as_module() for name, adapter in self.by_name().items()}
