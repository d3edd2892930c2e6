"""Full (LyCORIS `full`; the WebUI's network_full.py): the whole weight change `diff` of each layer is trained, as a
fine-tune of those layers would, stored apart from the model. No alpha (scale 1); init zero (no change)."""

from __future__ import annotations

import torch

from finetune_core.formats.networks.module_type import Layer, NetworkType, Shape, Tensors

DIFF = "diff"


class Full(NetworkType):
    name, algo, label = "full", "full", "Full"
    trains = "the whole weight change of each layer"
    required = parts = (DIFF,)
    has_rank = has_alpha = False

    def shapes(self, layer: Layer, shape: Shape) -> dict[str, tuple[int, ...]]:
        return {DIFF: layer.weight_shape}

    def updown(self, tensors: Tensors, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return tensors[DIFF].reshape(weight.shape), None

    def describe(self, tensors: Tensors) -> str:
        return "full weights"
