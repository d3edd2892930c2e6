"""LoRA / LoCon (kohya's networks.lora; the WebUI's network_lora.py): up @ down, scale alpha / rank.

down (rank, in[, kh, kw]) copies a convolution's kernel, stride and padding; up (out, rank[, 1, 1]). kohya's init:
down kaiming-uniform, up zero, so a new module changes nothing.
"""

from __future__ import annotations

import torch
from torch.nn import functional

from finetune_core.formats.networks.module_type import (
    CONV,
    Dropouts,
    Layer,
    NetworkType,
    Shape,
    Tensors,
    kaiming,
    rank_problem,
)

DOWN, UP = "lora_down.weight", "lora_up.weight"


class Lora(NetworkType):
    name, algo, label = "lora", "locon", "LoRA / LoCon"
    trains = "two low-rank matrices per layer (up @ down)"
    required = parts = (DOWN, UP)
    has_dora = True

    def problem(self, layer: Layer, shape: Shape) -> str | None:
        return rank_problem(layer, shape)

    def shapes(self, layer: Layer, shape: Shape) -> dict[str, tuple[int, ...]]:
        kernel = layer.kernel_size if layer.kind == CONV else None
        down = (shape.rank, layer.in_features, *kernel) if kernel else (shape.rank, layer.in_features)
        up = (layer.out_features, shape.rank, 1, 1) if kernel else (layer.out_features, shape.rank)
        return {DOWN: down, UP: up}

    def init(self, tensors: dict[str, torch.Tensor], layer: Layer, generator: torch.Generator) -> None:
        tensors[DOWN].copy_(kaiming(tuple(tensors[DOWN].shape), generator))
        tensors[UP].zero_()

    def dim(self, tensors: Tensors) -> int | None:
        return int(tensors[DOWN].shape[0])

    def updown(self, tensors: Tensors, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        up, down = tensors[UP], tensors[DOWN]
        return (up.flatten(1) @ down.flatten(1)).reshape(weight.shape), None

    def forward(self, tensors: Tensors, x: torch.Tensor, layer: Layer, scale: float,
                dropouts: Dropouts | None) -> torch.Tensor | None:
        """up(dropout(down(x))) * scale, as kohya's LoRAModule.forward (with its per-rank dropout)."""
        down, up = tensors[DOWN], tensors[UP]
        conv = down.dim() == 4
        if conv:
            hidden = functional.conv2d(x, down, stride=layer.stride, padding=layer.padding)
        else:
            hidden = functional.linear(x, down)
        if dropouts is not None and dropouts.value:
            hidden = functional.dropout(hidden, p=dropouts.value)
        if dropouts is not None and dropouts.rank:
            rank = down.shape[0]
            mask = torch.rand((hidden.shape[0], rank), device=hidden.device) > dropouts.rank
            shape = (hidden.shape[0], rank, 1, 1) if conv else (hidden.shape[0], *([1] * (hidden.dim() - 2)), rank)
            hidden = hidden * mask.reshape(shape).to(hidden.dtype)
            scale /= 1.0 - dropouts.rank  # as kohya: treated as if the rank were smaller
        out = functional.conv2d(hidden, up) if conv else functional.linear(hidden, up)
        return out * scale
