"""Shared by the tests of the methods with prior preservation (DreamBooth; LoRA's DreamBooth mode): an instance
folder and a batch of an instance and a class sample."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from finetune_core.data.data_batch import DataBatch
from finetune_core.train import objective
from finetune_core.train.train_batch import TrainBatch
from tests.conftest import EXAMPLES


def instance_folder(tmp: Path, names: tuple[str, ...] = ("ball-01", "ball-03")) -> Path:
    folder = tmp / "instances"
    folder.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(EXAMPLES / f"{name}.png", folder)
    return folder


def paired_batch(model: Any, flags: list[bool]) -> TrainBatch:
    """Samples flagged as class samples (`is_class`) or not, with fixed noise and timesteps."""
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(len(flags), 4, 8, 8, generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.tensor([300, 700][:len(flags)])
    alphas = model.alphas_cumprod()
    data = DataBatch(latents, ["a photo of sks ball", "a photo of a ball"][:len(flags)], torch.zeros(len(flags), 6),
                     extras={"is_class": flags})
    return TrainBatch(data, latents, noise, t, objective.add_noise(latents, noise, t, alphas),
                      objective.training_target(model.prediction_type, latents, noise, t, alphas), alphas,
                      data.size_cond)
