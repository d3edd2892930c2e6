import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune_core.data.transforms import (
    CropPlan,
    alpha_weight,
    apply_plan,
    flipped_crop_left,
    load_image,
    plan_crop,
    probe_image,
)
from finetune_core.errors import DatasetError


@pytest.mark.parametrize("mode,has_alpha", [("L", False), ("LA", True), ("RGBA", True), ("P", False),
                                            ("CMYK", False), ("1", False)])
def test_every_mode_loads_as_rgb(tmp_path: Path, make_image, mode: str, has_alpha: bool):
    ext = "jpg" if mode == "CMYK" else "png"
    path = make_image(tmp_path / f"x.{ext}", (20, 10), "RGBA" if mode == "LA" else mode)
    if mode == "LA":
        Image.open(path).convert("LA").save(path)
    image = load_image(path)
    assert image.rgb.shape == (3, 10, 20) and image.rgb.dtype == torch.float32
    assert 0.0 <= float(image.rgb.min()) and float(image.rgb.max()) <= 1.0
    assert (image.alpha is not None) == has_alpha
    assert probe_image(path.read_bytes(), path).has_alpha == has_alpha


def test_palette_transparency_keeps_alpha(tmp_path: Path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    image.info["transparency"] = 0
    path = tmp_path / "p.png"
    image.save(path, transparency=0)
    loaded = load_image(path)
    assert loaded.alpha is not None
    assert float(loaded.alpha[0, 0, 0]) == 1.0 and float(loaded.alpha[0, 1, 1]) == 0.0


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path):
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = load_image(path).rgb
    assert torch.allclose(rgb[:, 0], torch.tensor([0.0, 1000 / 65535, 32768 / 65535, 1.0]).expand(3, 4), atol=1e-4)


def test_corrupt_file_is_a_dataset_error_naming_it(tmp_path: Path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError, match="broken.png"):
        load_image(path)


def test_plan_covers_target_and_centers():
    plan = plan_crop((200, 100), (64, 64), "center", None)
    assert (plan.resized_w, plan.resized_h) == (128, 64) and (plan.left, plan.top) == (32, 0)
    boxes = {plan_crop((200, 100), (64, 64), "random", random.Random(s)).left for s in range(20)}
    assert len(boxes) > 3 and all(0 <= b <= 64 for b in boxes)
    tiny = plan_crop((1, 1), (64, 64), "center", None)
    assert (tiny.resized_w, tiny.resized_h, tiny.left, tiny.top) == (64, 64, 0, 0)


def test_apply_plan_crops_and_really_flips():
    image = torch.rand(3, 16, 32)
    plan = CropPlan(32, 16, 8, 0, 16, 16)
    straight = apply_plan(image, plan, flip=False)
    assert torch.equal(straight, image[:, :, 8:24])
    assert torch.equal(apply_plan(image, plan, flip=True), torch.flip(straight, dims=[2]))
    assert flipped_crop_left(CropPlan(32, 16, 4, 0, 16, 16)) == 12


def test_alpha_weight_min_zero_mean_one():
    alpha = torch.linspace(0.2, 1.0, 64).expand(1, 64, 64).clone()
    weight = alpha_weight(alpha, 8, 8)
    assert weight.shape == (1, 8, 8)
    assert abs(float(weight.min())) < 1e-6 and abs(float(weight.mean()) - 1.0) < 1e-5
    assert torch.equal(alpha_weight(torch.ones(1, 64, 64), 8, 8), torch.ones(1, 8, 8))
    assert torch.equal(alpha_weight(None, 4, 2), torch.ones(1, 4, 2))
