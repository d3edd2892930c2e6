"""OFT (Qiu et al. 2023; kohya's networks.oft and LyCORIS's `diag-oft`, the WebUI's network_oft.py): each layer's
weight is turned by a block-diagonal orthogonal matrix R, change = R-turned weight - weight, scale 1.

`oft_blocks` (blocks, n, n) with n = out / blocks; R per block is the Cayley transform (I + Q)(I - Q)^-1 of the
skew-symmetric Q = B - B^T, whose norm is clamped to `alpha` * out when `alpha` (the constraint) is not 0. Init zero:
R = I, no change.
"""

from __future__ import annotations

import torch

from finetune_core.formats.networks.module_type import Layer, NetworkType, Shape, Tensors

BLOCKS = "oft_blocks"


class Oft(NetworkType):
    name, algo, label = "oft", "diag-oft", "OFT"
    trains = "a block-diagonal rotation of each layer's outputs"
    required = parts = (BLOCKS,)
    has_rank = False

    def problem(self, layer: Layer, shape: Shape) -> str | None:
        if layer.out_features % shape.blocks:
            return (f"the OFT block count {shape.blocks} does not divide the width {layer.out_features} of the layer "
                    f"{layer.name}; use a block count that divides every adapted layer's width (powers of two from 8 "
                    f"to 64 fit SD1, SD2 and SDXL)")
        return None

    def shapes(self, layer: Layer, shape: Shape) -> dict[str, tuple[int, ...]]:
        size = layer.out_features // shape.blocks
        return {BLOCKS: (shape.blocks, size, size)}

    def dim(self, tensors: Tensors) -> int | None:
        return int(tensors[BLOCKS].shape[0])

    def scale(self, tensors: Tensors, alpha: float | None) -> float:
        return 1.0  # the WebUI sets OFT's scale to 1; its alpha is the constraint

    def rotation(self, blocks: torch.Tensor, constraint: float) -> torch.Tensor:
        """R per block: the Cayley transform of Q = B - B^T, Q's norm clamped to `constraint` when not 0."""
        q = blocks - blocks.transpose(-1, -2)
        if constraint:
            norm = torch.linalg.vector_norm(q.flatten())
            q = q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))
        eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
        # one block at a time: torch's batched CPU inverse fails with more than one thread on some builds
        inverse = torch.stack([torch.linalg.inv(block) for block in eye - q])
        return (eye + q) @ inverse

    def alpha(self, shape: Shape, alpha: float) -> float | None:
        return shape.constraint

    def updown(self, tensors: Tensors, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """R^T applied per block to the weight's output rows, minus the weight."""
        constraint = float(tensors["alpha"]) * weight.shape[0] if "alpha" in tensors else 0.0
        blocks = tensors[BLOCKS].float()
        rotation = self.rotation(blocks, constraint)
        count, size = rotation.shape[0], rotation.shape[1]
        grouped = weight.float().reshape(count, size, *weight.shape[1:])
        merged = torch.einsum("knm,kn...->km...", rotation, grouped).reshape(weight.shape)
        return merged - weight.float(), None

    def describe(self, tensors: Tensors) -> str:
        return f"{int(tensors[BLOCKS].shape[0])} blocks"
