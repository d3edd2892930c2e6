"""LoKr (LyCORIS `lokr`; the WebUI's network_lokr.py): the Kronecker product w1 (x) w2 of a small full matrix and a
larger one that is a low-rank pair w2_a @ w2_b (or, with full matrix, whole).

Each side of a layer splits into two factors as LyCORIS's `factorization` does; w1 is (out_l, in_m), w2 (out_k, in_n)
[x kh x kw]. The WebUI scales by alpha / rank only when a low-rank pair exists (both factors whole: scale 1).
LyCORIS's init: w1 and w2_a kaiming-uniform, w2_b (or the whole w2) zero.
"""

from __future__ import annotations

import math

import torch

from finetune_core.formats.networks.module_type import CONV, Layer, NetworkType, Shape, Tensors, kaiming

W1, W2, W2A, W2B = "lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n: `factor` itself when it divides, else the split whose smaller side
    is the largest divisor up to `factor` (-1: up to the square root), as LyCORIS's lokr.factorization."""
    if factor > 0 and dimension % factor == 0:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        candidate = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if candidate > limit:
            break
        m, n = candidate, dimension // candidate
    return min(m, n), max(m, n)


class Lokr(NetworkType):
    name, algo, label = "lokr", "lokr", "LoKr"
    trains = "a Kronecker product of a small matrix and a low-rank pair per layer"
    required = (W1,)
    parts = (W1, W2, W2A, W2B)
    has_dora = True

    def accepts(self, parts: object) -> bool:
        names = set(parts)  # type: ignore[call-overload]
        return W1 in names and (W2 in names or {W2A, W2B} <= names)

    def problem(self, layer: Layer, shape: Shape) -> str | None:
        bad = [w for w in (layer.in_features, layer.out_features) if shape.factor > 0 and w % shape.factor]
        if bad:
            return (f"the LoKr factor {shape.factor} does not divide the layer {layer.name} ({layer.in_features} "
                    f"inputs, {layer.out_features} outputs); use a factor that divides both, or -1 (automatic)")
        return None

    def _sides(self, layer: Layer, shape: Shape) -> tuple[tuple[int, int], tuple[int, int]]:
        out_l, out_k = factorization(layer.out_features, shape.factor)
        in_m, in_n = factorization(layer.in_features, shape.factor)
        return (out_l, in_m), (out_k, in_n)

    def shapes(self, layer: Layer, shape: Shape) -> dict[str, tuple[int, ...]]:
        (out_l, in_m), (out_k, in_n) = self._sides(layer, shape)
        kernel = layer.kernel_size if layer.kind == CONV and layer.kernel_size else ()
        if shape.full_matrix or shape.rank >= max(out_k, in_n) / 2:  # LyCORIS: a pair that large is no saving
            return {W1: (out_l, in_m), W2: (out_k, in_n, *kernel)}
        return {W1: (out_l, in_m), W2A: (out_k, shape.rank), W2B: (shape.rank, in_n * math.prod(kernel or (1,)))}

    def init(self, tensors: dict[str, torch.Tensor], layer: Layer, generator: torch.Generator) -> None:
        tensors[W1].copy_(kaiming(tuple(tensors[W1].shape), generator))
        if W2A in tensors:
            tensors[W2A].copy_(kaiming(tuple(tensors[W2A].shape), generator))
            tensors[W2B].zero_()
        else:
            tensors[W2].zero_()

    def dim(self, tensors: Tensors) -> int | None:
        return int(tensors[W2B].shape[0]) if W2B in tensors else None

    def updown(self, tensors: Tensors, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        w1 = tensors[W1]
        w2 = tensors[W2] if W2 in tensors else tensors[W2A] @ tensors[W2B]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2.contiguous()).reshape(weight.shape), None

    def describe(self, tensors: Tensors) -> str:
        w1 = tensors[W1]
        size = f"factor {int(w1.shape[0])}x{int(w1.shape[1])}"
        dim = self.dim(tensors)
        return f"{size}, rank {dim}" if dim is not None else f"{size}, full matrix"
