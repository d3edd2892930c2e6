"""What every network type of the WebUI's built-in Lora extension shares (extensions-builtin/Lora/network.py,
v1.10.1): a type is known by the key parts of a module, computes a weight change ("updown") from its tensors and the
layer's current weight, and the shared finishing steps scale it, apply DoRA and the multiplier.

A type holds only its maths, as pure functions of a module's tensors (a dict by key part, e.g. `lora_down.weight`):
`shapes` and `init` (a new module), `updown` (the change), `dim` (the WebUI's rank, for alpha / dim) and the layer
kinds it can adapt. Our training and our file reader use the same functions, so what we train is what the WebUI
applies.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

Tensors = Mapping[str, torch.Tensor]  # a module's tensors by key part; `alpha` (0-d) among them where written
LINEAR, CONV, NORM = "linear", "conv", "norm"  # the layer kinds a type may adapt
DORA = "dora_scale"


@dataclass(frozen=True)
class Layer:
    """The layer a module adapts, as the maths needs it: its kind, widths, kernel (conv), norm groups."""

    name: str
    kind: str  # LINEAR, CONV or NORM
    in_features: int
    out_features: int
    kernel_size: tuple[int, int] | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == NORM:
            return (self.out_features,)
        return (self.out_features, self.in_features, *(self.kernel_size or ()))


@dataclass(frozen=True)
class Dropouts:
    """kohya's training-time dropouts on a low-rank module (off at inference)."""

    value: float = 0.0  # network_dropout: on the rank values
    rank: float = 0.0  # rank_dropout: whole ranks per sample, the scale raised by 1 / (1 - p)


@dataclass(frozen=True)
class Shape:
    """A type's own settings that shape a new module (each type reads the ones it has)."""

    rank: int = 16
    factor: int = -1  # LoKr: the Kronecker factor; -1 = the most balanced split (LyCORIS's default)
    full_matrix: bool = False  # LoKr: the larger factor as a full matrix, no low-rank pair
    blocks: int = 64  # OFT: blocks per layer (each output width must divide by it)
    constraint: float = 0.0  # OFT: the rotation's norm bound (times the width); 0 = none


class NetworkType:
    """One module type, in the style of the WebUI's `ModuleType` + `NetworkModule.calc_updown`."""

    name = ""  # our --network value
    algo = ""  # LyCORIS's `algo` for ss_network_args
    label = ""
    trains = ""  # what it trains, one phrase (README, help)
    required: tuple[str, ...] = ()  # key parts that make a module this type (the WebUI's create_module test)
    parts: tuple[str, ...] = ()  # every part it writes, besides alpha and dora_scale
    kinds: frozenset[str] = frozenset({LINEAR, CONV})
    has_rank = True  # the rank / alpha / conv settings shape it
    has_alpha = True  # a per-module `alpha` is written
    has_dora = False  # a DoRA form (dora_scale) exists in the WebUI for it
    fixed: tuple[str, ...] = ()  # parts written but not trained (IA3's on_input)

    def accepts(self, parts: Collection[str]) -> bool:
        return all(part in parts for part in self.required)

    def problem(self, layer: Layer, shape: Shape) -> str | None:
        """Why these settings cannot shape a module for `layer` (None when they can)."""
        return None

    def shapes(self, layer: Layer, shape: Shape) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def alpha(self, shape: Shape, alpha: float) -> float | None:
        """The `alpha` a new module is written with (the alpha setting; None for a type without one)."""
        return alpha if self.has_alpha else None

    def init(self, tensors: dict[str, torch.Tensor], layer: Layer, generator: torch.Generator) -> None:
        """Fill a new module's tensors in place (LyCORIS's / kohya's init for the type)."""
        for tensor in tensors.values():
            tensor.zero_()

    def dim(self, tensors: Tensors) -> int | None:
        """The WebUI's `dim`: alpha / dim scales the change; None means scale 1."""
        return None

    def scale(self, tensors: Tensors, alpha: float | None) -> float:
        """`NetworkModule.calc_scale`: alpha / dim when both are known, else 1."""
        dim = self.dim(tensors)
        return alpha / dim if dim is not None and alpha is not None else 1.0

    def updown(self, tensors: Tensors, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the change of `weight`, an extra bias or None) before scale, DoRA and the multiplier."""
        raise NotImplementedError

    def forward(self, tensors: Tensors, x: torch.Tensor, layer: Layer, scale: float,
                dropouts: Dropouts | None) -> torch.Tensor | None:
        """The output change for input `x` computed without the full weight change (a low-rank shortcut), or None
        to have it computed from `updown`. Only without DoRA, which needs the merged weight."""
        return None

    def describe(self, tensors: Tensors) -> str:
        """Its size in a few words (inspect, notes): "rank 4", "4 blocks", ..."""
        dim = self.dim(tensors)
        return f"rank {dim}" if dim is not None else "full"


def rank_problem(layer: Layer, shape: Shape) -> str | None:
    """A rank above the smaller side of the layer's weight matrix adds nothing: refused, naming the layer."""
    capacity = min(layer.in_features * math.prod(layer.kernel_size or (1,)), layer.out_features)
    if shape.rank > capacity:
        return (f"the rank {shape.rank} is larger than the layer {layer.name} can use ({capacity}: its "
                f"{layer.in_features} inputs and {layer.out_features} outputs); use a rank of at most {capacity}")
    return None


def kaiming(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """torch's kaiming_uniform_(a=sqrt(5)) (its default Linear/Conv init) drawn from `generator`."""
    fan_in = math.prod(shape[1:])
    bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))
    return torch.rand(shape, generator=generator) * 2 * bound - bound


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each input column over every other axis, shaped [1, in, 1, ...] (the WebUI's DoRA norm)."""
    columns = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1, keepdim=True)
    return columns.reshape(weight.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1)


def weight_decompose(updown: torch.Tensor, weight: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA (Liu et al. 2024) as `NetworkModule.apply_weight_decompose`: (W + d) * m / |W + d| - W, per column."""
    merged = weight.to(updown.dtype) + updown
    return merged * (dora_scale.to(updown.dtype) / column_norm(merged)) - weight.to(updown.dtype)


def finalize(updown: torch.Tensor, weight: torch.Tensor, scale: float, dora_scale: torch.Tensor | None,
             multiplier: float) -> torch.Tensor:
    """`NetworkModule.finalize_updown`: shaped as the weight, times the scale, DoRA, times the multiplier."""
    updown = updown.reshape(weight.shape) * scale
    if dora_scale is not None:
        updown = weight_decompose(updown, weight, dora_scale)
    return updown * multiplier
