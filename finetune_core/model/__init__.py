"""The model side: the `DiffusionModel` interface trainers use, and loading a model for standalone use.

Importing this package does not import diffusers or transformers; `load_model` imports them when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune_core.model.interface import (
    EPSILON,
    FAMILIES,
    SD1,
    SD2,
    SDXL,
    V_PREDICTION,
    ChunkHook,
    ContextTransform,
    DiffusionModel,
    EncodedText,
    LatentMoments,
    ModelIdentity,
    SampleRequest,
    TextChunks,
    TextConditioning,
    TextEncoderSpec,
    TrainableEmbedding,
    TrainingSession,
    TrainingSetup,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "EPSILON",
    "FAMILIES",
    "SD1",
    "SD2",
    "SDXL",
    "V_PREDICTION",
    "ChunkHook",
    "ContextTransform",
    "DiffusionModel",
    "EncodedText",
    "LatentMoments",
    "ModelIdentity",
    "SampleRequest",
    "TextConditioning",
    "TextChunks",
    "TextEncoderSpec",
    "TrainableEmbedding",
    "TrainingSession",
    "TrainingSetup",
    "load_model",
]


def load_model(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> DiffusionModel:
    """Load a built-in tiny model, a diffusers folder or a single-file checkpoint (see `model.loading`)."""
    import torch

    from finetune_core.model import loading

    return loading.load_model(spec, device=device, dtype=dtype or torch.float32)
