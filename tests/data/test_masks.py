"""Attention-mask files: DreamArtist's value scale, following their image's crop and flip, never trained on as images,
multiplied with the alpha weight, and refused with a sentence when of the wrong size or not grayscale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune_core.data.dataset import ImageDataset
from finetune_core.data.dataset_config import DatasetConfig
from finetune_core.data.masks import load_mask, mask_weight, split_masks
from finetune_core.data.scan import scan_dataset
from finetune_core.errors import DatasetError


def _mask(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values.astype(np.uint8), "L").save(path)
    return path


def test_the_value_scale_is_the_originals() -> None:
    grey = torch.tensor([0.0, 63.5, 127.0, 191.0, 255.0]).reshape(1, 1, 5) / 255
    # black 0, a quarter 0.5, mid-grey 1, three quarters 3, white 5 (the README's table)
    weights = mask_weight(grey.expand(1, 5, 5).clone(), 5, 5)[0, 0]
    torch.testing.assert_close(weights, torch.tensor([0.0, 0.5, 1.0, 3.0, 5.0]), atol=1e-4, rtol=0)


def test_masks_pair_with_their_image_and_are_not_images(tmp_path: Path, make_image) -> None:
    for name in ("a.png", "a_att.png", "b.jpg", "b_att.png", "c_att.png", "d.png"):
        make_image(tmp_path / name)
    images, masks = split_masks(tmp_path.iterdir())
    assert [p.name for p in images] == ["a.png", "b.jpg", "c_att.png", "d.png"]  # c_att has no image c: an image
    assert {i.name: m.name for i, m in masks.items()} == {"a.png": "a_att.png", "b.jpg": "b_att.png"}
    records = scan_dataset(tmp_path).records
    assert [(r.path.name, r.mask.name if r.mask else None) for r in records] == \
        [("a.png", "a_att.png"), ("b.jpg", "b_att.png"), ("c_att.png", None), ("d.png", None)]


def test_the_mask_follows_the_crop_and_the_flip_and_multiplies_the_alpha(tmp_path: Path, make_image,
                                                                         fake_model) -> None:
    make_image(tmp_path / "wide.png", size=(128, 64), mode="RGBA")  # alpha: a left-to-right ramp
    left_black = np.full((64, 128), 255)
    left_black[:, :64] = 0
    _mask(tmp_path / "wide_att.png", left_black)
    make_image(tmp_path / "plain.png", size=(64, 64), seed=1)
    config = DatasetConfig(data_dir=str(tmp_path), width=64, height=64, attention_masks=True, crop="center",
                           template="none.txt")
    data = ImageDataset(config)
    data.prepare(fake_model)
    # sorted: plain.png, wide.png
    assert torch.equal(data._sample(0, False).weight, torch.ones(1, 8, 8))  # no mask: weight 1
    weight = data._sample(1, False).weight[0]
    # the centre crop keeps columns 32..95: its left half is black (0), its right half white (5)
    assert float(weight[:, :3].max()) == 0.0 and float(weight[:, 5:].min()) > 4.9
    alpha = dict(config.__dict__, use_alpha_weight=True, flip_p=1.0)
    both = ImageDataset(DatasetConfig(**alpha))
    both.prepare(fake_model)
    unflipped, flipped = both._sample(1, False).weight[0], both._sample(1, True).weight[0]
    assert float(unflipped[:, :3].max()) == 0.0 and float(flipped[:, -3:].max()) == 0.0  # mirrored with the image
    assert float(unflipped[:, 5:].std()) > 0  # the alpha ramp multiplies the white half
    batch = both.get_batch(0, 0)
    assert batch.loss_weight is not None and batch.loss_weight.shape[1:] == (1, 8, 8)


def test_masks_off_leave_the_weight_alone(tmp_path: Path, make_image, fake_model) -> None:
    make_image(tmp_path / "a.png")
    _mask(tmp_path / "a_att.png", np.zeros((64, 64)))
    data = ImageDataset(DatasetConfig(data_dir=str(tmp_path), width=64, height=64, template="none.txt"))
    data.prepare(fake_model)
    assert len(data) == 1 and data.get_batch(0, 0).loss_weight is None


def test_a_mask_of_another_size_or_in_colour_is_refused(tmp_path: Path) -> None:
    _mask(tmp_path / "small.png", np.zeros((32, 32)))
    with pytest.raises(DatasetError, match=r"small.png is 32x32 but its image is 64x64"):
        load_mask(tmp_path / "small.png", (64, 64))
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "green.png")
    with pytest.raises(DatasetError, match="is in colour"):
        load_mask(tmp_path / "green.png", (64, 64))
    Image.new("LA", (64, 64), (128, 0)).save(tmp_path / "clear.png")
    with pytest.raises(DatasetError, match="transparent"):
        load_mask(tmp_path / "clear.png", (64, 64))
    Image.new("RGB", (64, 64), (128, 128, 128)).save(tmp_path / "grey_rgb.png")  # saved as RGB but grey: fine
    assert float(load_mask(tmp_path / "grey_rgb.png", (64, 64)).mean()) == pytest.approx(128 / 255)
