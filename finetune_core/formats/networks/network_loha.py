"""LoHa (LyCORIS `loha`; the WebUI's network_hada.py): the Hadamard product of two low-rank products,
(w1_a @ w1_b) * (w2_a @ w2_b), scale alpha / rank.

w*_a (out, rank), w*_b (rank, in * kh * kw). LyCORIS's init: w1_b and w2_b normal (std 1), w1_a normal (std 0.1),
w2_a zero, so a new module changes nothing.
"""

from __future__ import annotations

import math

import torch

from finetune_core.formats.networks.module_type import Layer, NetworkType, Shape, Tensors, rank_problem

W1A, W1B, W2A, W2B = "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"


class Loha(NetworkType):
    name, algo, label = "loha", "loha", "LoHa"
    trains = "a Hadamard product of two low-rank products per layer"
    required = parts = (W1A, W1B, W2A, W2B)
    has_dora = True

    def problem(self, layer: Layer, shape: Shape) -> str | None:
        return rank_problem(layer, shape)

    def shapes(self, layer: Layer, shape: Shape) -> dict[str, tuple[int, ...]]:
        inputs = layer.in_features * math.prod(layer.kernel_size or (1,))
        return {W1A: (layer.out_features, shape.rank), W1B: (shape.rank, inputs),
                W2A: (layer.out_features, shape.rank), W2B: (shape.rank, inputs)}

    def init(self, tensors: dict[str, torch.Tensor], layer: Layer, generator: torch.Generator) -> None:
        for part, std in ((W1B, 1.0), (W1A, 0.1), (W2B, 1.0)):
            tensors[part].copy_(torch.randn(tensors[part].shape, generator=generator) * std)
        tensors[W2A].zero_()

    def dim(self, tensors: Tensors) -> int | None:
        return int(tensors[W1B].shape[0])

    def updown(self, tensors: Tensors, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        first = tensors[W1A].flatten(1) @ tensors[W1B].flatten(1)
        second = tensors[W2A].flatten(1) @ tensors[W2B].flatten(1)
        return (first * second).reshape(weight.shape), None
