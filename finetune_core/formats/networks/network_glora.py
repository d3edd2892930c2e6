"""GLoRA (Chavan et al. 2023; LyCORIS `glora` in the layout the WebUI v1.10.1 reads, network_glora.py): change =
b2 @ b1 + weight @ a2 @ a1, a low-rank term plus a low-rank transform of the weight itself.

a1 (rank, in), a2 (in, rank), b1 (rank, in), b2 (out, rank); the WebUI v1.10.1 applies it at scale 1 (it sets no
rank), so alpha is written equal to the rank, which gives LyCORIS's alpha / rank the same 1. Linear layers only (the
WebUI multiplies the weight as a matrix). LyCORIS's init: a1, b1 kaiming-uniform, a2, b2 zero (no change).
"""

from __future__ import annotations

import torch

from finetune_core.formats.networks.module_type import LINEAR, Layer, NetworkType, Shape, Tensors, kaiming, rank_problem

A1, A2, B1, B2 = "a1.weight", "a2.weight", "b1.weight", "b2.weight"


class Glora(NetworkType):
    name, algo, label = "glora", "glora", "GLoRA"
    trains = "a low-rank term plus a low-rank transform of each linear layer's weight"
    required = (A1, A2, B1, B2, "alpha")
    parts = (A1, A2, B1, B2)
    kinds = frozenset({LINEAR})

    def problem(self, layer: Layer, shape: Shape) -> str | None:
        return rank_problem(layer, shape)

    def shapes(self, layer: Layer, shape: Shape) -> dict[str, tuple[int, ...]]:
        rank, width = shape.rank, layer.in_features
        return {A1: (rank, width), A2: (width, rank), B1: (rank, width), B2: (layer.out_features, rank)}

    def init(self, tensors: dict[str, torch.Tensor], layer: Layer, generator: torch.Generator) -> None:
        for part in (A1, B1):
            tensors[part].copy_(kaiming(tuple(tensors[part].shape), generator))
        tensors[A2].zero_()
        tensors[B2].zero_()

    def alpha(self, shape: Shape, alpha: float) -> float | None:
        return float(shape.rank)

    def scale(self, tensors: Tensors, alpha: float | None) -> float:
        return 1.0  # the WebUI v1.10.1 sets no dim for GLoRA

    def updown(self, tensors: Tensors, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = weight.to(tensors[A1].dtype)
        return tensors[B2] @ tensors[B1] + (base @ tensors[A2]) @ tensors[A1], None

    def describe(self, tensors: Tensors) -> str:
        return f"rank {int(tensors[A1].shape[0])}"
