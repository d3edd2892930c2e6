"""Instance images paired with class images: same size in one batch, flagged, every class image once per round,
deterministic for resume, one class encoding per instance size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune_core.data.dataset import ImageDataset
from finetune_core.data.dataset_config import DatasetConfig
from finetune_core.data.paired import IS_CLASS, PairedDataset
from finetune_core.data.scan import scan_dataset
from finetune_core.errors import DatasetError


def _paired(instances: Path, classes: Path, **data) -> PairedDataset:
    config = DatasetConfig(data_dir=str(instances), width=64, height=64, latent_sampling="deterministic", **data)
    records = scan_dataset(classes).records
    return PairedDataset(ImageDataset(config, placeholder="sks", lines=["a photo of [name] [filewords]"]),
                         lambda model: records, ["a photo of a [filewords]"])


def test_batches_hold_instances_then_as_many_class_images(tmp_path, make_image, fake_model):
    for i in range(3):
        make_image(tmp_path / "inst" / f"i{i}.png", seed=i)
        (tmp_path / "inst" / f"i{i}.txt").write_text(f"ball {i}")
    for i in range(5):
        make_image(tmp_path / "cls" / f"c{i}.png", (96, 96), seed=10 + i)
        (tmp_path / "cls" / f"c{i}.txt").write_text("ball")
    data = _paired(tmp_path / "inst", tmp_path / "cls", batch_size=2)
    data.prepare(fake_model)
    assert fake_model.encode_calls == 0  # each image is encoded when a batch first draws it
    batch = data.get_batch(0, seed=4)
    n = len(batch) // 2
    assert fake_model.encode_calls == 2 * n
    assert batch.extras[IS_CLASS] == [False] * n + [True] * n and batch.latents.shape == (2 * n, 4, 8, 8)
    assert all(p.startswith("a photo of sks ball") for p in batch.prompts[:n])
    assert batch.prompts[n:] == ["a photo of a ball"] * n
    assert all("cls" in p for p in batch.image_paths[n:])
    again = data.get_batch(0, seed=4)
    assert torch.equal(again.latents, batch.latents) and again.image_paths == batch.image_paths


def test_each_class_image_once_per_round(tmp_path, make_image, fake_model):
    make_image(tmp_path / "inst" / "i.png")
    for i in range(4):
        make_image(tmp_path / "cls" / f"c{i}.png", seed=i)
    data = _paired(tmp_path / "inst", tmp_path / "cls")
    data.prepare(fake_model)
    picks = [data.class_indices(seed=1, first=k, count=1)[0] for k in range(12)]
    for r in range(3):
        assert sorted(picks[4 * r:4 * r + 4]) == [0, 1, 2, 3]
    assert picks[:4] != picks[4:8] or picks[4:8] != picks[8:]  # rounds are shuffled anew


def test_buckets_get_class_images_of_their_own_size(tmp_path, make_image, fake_model):
    make_image(tmp_path / "inst" / "wide.png", (128, 64))
    make_image(tmp_path / "inst" / "square.png", (64, 64), seed=1)
    for i in range(2):
        make_image(tmp_path / "cls" / f"c{i}.png", (128, 128), seed=5 + i)
    data = _paired(tmp_path / "inst", tmp_path / "cls", resize_mode="none")
    data.prepare(fake_model)
    shapes = set()
    for index in range(data.batches_per_epoch()):
        batch = data.get_batch(index, seed=0)
        assert batch.latents.shape[0] == 2  # one instance, one class image, same size
        shapes.add(tuple(batch.latents.shape[-2:]))
        assert torch.equal(batch.size_cond[0, 4:6], batch.size_cond[1, 4:6])
    assert shapes == {(8, 16), (8, 8)}


def test_no_class_images_is_refused(tmp_path, make_image, fake_model):
    make_image(tmp_path / "inst" / "i.png")
    config = DatasetConfig(data_dir=str(tmp_path / "inst"), width=64, height=64)
    data = PairedDataset(ImageDataset(config), lambda model: [], ["a dog"])
    with pytest.raises(DatasetError, match="no class images"):
        data.prepare(fake_model)


def test_alpha_weights_of_instances_get_unit_weights_for_class_images(tmp_path, make_image, fake_model):
    make_image(tmp_path / "inst" / "i.png", mode="RGBA")
    make_image(tmp_path / "cls" / "c.png")
    data = _paired(tmp_path / "inst", tmp_path / "cls", use_alpha_weight=True)
    data.prepare(fake_model)
    batch = data.get_batch(0, 0)
    assert batch.loss_weight is not None and torch.equal(batch.loss_weight[1], torch.ones_like(batch.loss_weight[1]))
