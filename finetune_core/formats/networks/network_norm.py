"""Norm (LyCORIS's norm modules; the WebUI's network_norm.py): the weight and bias changes `w_norm`, `b_norm` of the
UNet's GroupNorm and LayerNorm layers. No alpha (scale 1); init zero (no change)."""

from __future__ import annotations

import torch

from finetune_core.formats.networks.module_type import NORM, Layer, NetworkType, Shape, Tensors

WEIGHT, BIAS = "w_norm", "b_norm"


class Norm(NetworkType):
    name, algo, label = "norm", "norm", "Norm"
    trains = "the weight and bias of the UNet's norm layers"
    required = parts = (WEIGHT, BIAS)
    kinds = frozenset({NORM})
    has_rank = has_alpha = False

    def shapes(self, layer: Layer, shape: Shape) -> dict[str, tuple[int, ...]]:
        return {WEIGHT: (layer.out_features,), BIAS: (layer.out_features,)}

    def updown(self, tensors: Tensors, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return tensors[WEIGHT].reshape(weight.shape), tensors[BIAS]

    def describe(self, tensors: Tensors) -> str:
        return "norm weights and biases"
