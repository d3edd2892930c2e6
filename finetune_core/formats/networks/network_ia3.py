"""(IA)^3 (Liu et al. 2022; LyCORIS `ia3`; the WebUI's network_ia3.py): one learned scale per output channel (per input
channel where `on_input` is 1), the change being weight * scale. No alpha (scale 1).

Feed-forward output layers (`ff_net_2`, `mlp_fc2`) scale their inputs, the paper's rescaled inner activations; every
other layer its outputs. Linear layers only: the WebUI broadcasts the scale over a 2-D weight. Init zero (no change).
"""

from __future__ import annotations

import torch

from finetune_core.formats.networks.module_type import LINEAR, Layer, NetworkType, Shape, Tensors

WEIGHT, ON_INPUT = "weight", "on_input"
_ON_INPUT = ("ff_net_2", "mlp_fc2")


class Ia3(NetworkType):
    name, algo, label = "ia3", "ia3", "(IA)³"
    trains = "one scale per channel of each linear layer"
    required = parts = (WEIGHT, ON_INPUT)
    kinds = frozenset({LINEAR})
    has_rank = has_alpha = False
    fixed = (ON_INPUT,)

    def accepts(self, parts: object) -> bool:
        return WEIGHT in set(parts)  # type: ignore[call-overload]

    def shapes(self, layer: Layer, shape: Shape) -> dict[str, tuple[int, ...]]:
        on_input = layer.name.endswith(_ON_INPUT)
        return {WEIGHT: (layer.in_features if on_input else layer.out_features,), ON_INPUT: ()}

    def init(self, tensors: dict[str, torch.Tensor], layer: Layer, generator: torch.Generator) -> None:
        tensors[WEIGHT].zero_()
        tensors[ON_INPUT] = torch.tensor(int(layer.name.endswith(_ON_INPUT)))  # an integer flag, as LyCORIS writes

    def updown(self, tensors: Tensors, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        scales = tensors[WEIGHT]
        scales = scales.reshape(1, -1) if bool(tensors[ON_INPUT].item()) else scales.reshape(-1, 1)
        return weight.to(scales.dtype) * scales, None

    def describe(self, tensors: Tensors) -> str:
        return "per-channel scales"
