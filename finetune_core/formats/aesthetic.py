"""Aesthetic-gradient embeddings: one CLIP image-feature vector saved as a (1, D) float32 tensor (methods §5.1)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from finetune_core.errors import ArtifactError
from finetune_core.formats.atomic import load_pt, save_pt


def write_aesthetic_embedding(vector: torch.Tensor, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Save `vector` ([D] or [1, D]) as the (1, D) float32 tensor the aesthetic-gradients extension loads."""
    if not sniff(vector):
        raise ArtifactError(f"{path}: an aesthetic embedding is one vector of shape [D] or [1, D], "
                            f"got {_shape_text(vector)}")
    plain = vector.detach().to("cpu", torch.float32).reshape(1, -1).contiguous().clone()
    if not torch.isfinite(plain).all():
        raise ArtifactError(f"{path}: the aesthetic embedding has NaN or infinite values; it was not saved")
    return save_pt(plain, path, overwrite)


def read_aesthetic_embedding(path: str | os.PathLike[str]) -> torch.Tensor:
    """Load an aesthetic embedding as a (1, D) float32 tensor; also accepts the shipped 1-D and fp16 files."""
    obj = load_pt(path)
    if not sniff(obj):
        raise ArtifactError(f"{path} is not an aesthetic embedding (one tensor of shape [1, D]): "
                            f"it holds {_shape_text(obj)}")
    return obj.detach().to("cpu", torch.float32).reshape(1, -1)


def sniff(obj: Any) -> bool:
    """Whether a loaded object is one floating-point vector of shape [D] or [1, D]."""
    return (isinstance(obj, torch.Tensor) and obj.is_floating_point() and obj.numel() > 0
            and (obj.ndim == 1 or (obj.ndim == 2 and obj.shape[0] == 1)))


def _shape_text(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"
