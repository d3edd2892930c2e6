"""The batch the dataset hands to the loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from finetune_core.data.summary import DatasetSummary
    from finetune_core.model.interface import DiffusionModel


@dataclass
class DataBatch:
    """One micro-batch of prepared training samples, all of one resolution (one bucket).

    latents: (B, 4, h, w) scaled clean latents, already sampled per the latent sampling method, CPU float32.
    prompts: the prompt of every sample, template line and tags already drawn for this step.
    size_cond: (B, 6) original (h, w), crop (top, left), target (h, w) in pixels (SDXL micro-conditioning).
    loss_weight: (B, 1, h, w) per-latent-cell weight from the PNG alpha channel (min 0, mean 1), or None.
    pixels: (B, 3, H, W) the cropped/flipped training images in [-1, 1] when the dataset was asked to keep them
            (DreamArtist's reconstruction loss), else None.
    extras: per-sample method data (e.g. DreamBooth's `is_class` flags).
    """

    latents: torch.Tensor
    prompts: list[str]
    size_cond: torch.Tensor
    loss_weight: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    image_paths: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


class TrainingData(Protocol):
    """What the loop needs from a dataset. Deterministic: the same (index, seed) always gives the same batch.

    `prepare` runs once before the first step and gives the data its model; `get_batch` may then use the model's
    VAE (an image is encoded the first time a batch draws it: the backends keep the VAE usable inside a step, as
    DreamArtist's decode needs too) and always gives the same latents for the same sample.
    """

    batch_size: int

    def prepare(self, model: DiffusionModel, on_progress: Callable[[int, int], None] | None = None) -> None: ...

    def batches_per_epoch(self) -> int: ...

    def summary(self) -> DatasetSummary:
        """What the artefact records about the training set (images per folder, caption tags, sizes)."""
        ...

    def get_batch(self, index: int, seed: int) -> DataBatch:
        """Micro-batch number `index` of the run (0-based); epoch = index // batches_per_epoch()."""
        ...
