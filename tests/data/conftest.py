"""A fake model whose VAE is an 8x8 average pool, and helpers that write small images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from finetune_core.model.interface import LatentMoments, ModelIdentity


class FakeModel:
    """Just enough of DiffusionModel for datasets: encode_images is an average pool, so flips commute with it."""

    vae_scale = 8

    def __init__(self, shorthash: str = "0123456789") -> None:
        self.identity = ModelIdentity("fake", shorthash)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.encode_calls = 0

    def encode_images(self, pixels: torch.Tensor) -> LatentMoments:
        self.encode_calls += 1
        pooled = F.avg_pool2d(pixels, self.vae_scale)
        mean = torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)
        return LatentMoments(mean, torch.full_like(mean, 0.1))

    def count_tokens(self, text: str) -> int:
        return len(text.split())


def write_image(path: Path, size: tuple[int, int] = (64, 64), mode: str = "RGB", seed: int = 0) -> Path:
    """Write a random image of `size` (width, height) in `mode`; RGBA gets a left-to-right alpha ramp."""
    rng = np.random.default_rng(seed)
    width, height = size
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        ramp = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
        image = Image.fromarray(np.dstack([rgb, ramp]), "RGBA")
    elif mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture
def fake_model() -> FakeModel:
    return FakeModel()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Four captioned 64x64 RGB images."""
    root = tmp_path / "set"
    for i in range(4):
        write_image(root / f"img{i}.png", seed=i)
        (root / f"img{i}.txt").write_text(f"tag{i}a, tag{i}b, tag{i}c, tag{i}d", encoding="utf-8")
    return root


@pytest.fixture
def make_image():
    """The `write_image` helper, as a fixture so test modules need not import this file."""
    return write_image


@pytest.fixture
def make_model():
    """Build a FakeModel with a given VAE short hash."""
    return FakeModel
