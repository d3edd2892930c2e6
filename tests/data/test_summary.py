"""The dataset summary artefacts record: images per folder, kohya's caption tag counts, the sizes trained."""

from __future__ import annotations

from pathlib import Path

from finetune_core.data.dataset import ImageDataset
from finetune_core.data.dataset_config import DatasetConfig
from finetune_core.data.summary import caption_tags
from tests.data.conftest import write_image


def test_caption_tags_are_kohyas_comma_pieces():
    assert caption_tags(" Red Ball,  blue sky ,, red ball,") == ["red ball", "blue sky", "red ball"]
    assert caption_tags("a photo of sks dog") == ["a photo of sks dog"]
    assert caption_tags(" , ") == []


def test_summary_counts_folders_tags_and_bucket_sizes(tmp_path: Path):
    root = tmp_path / "set"
    captions = {"cats/a.png": ("Cat, sofa", (96, 96)), "cats/b.png": ("cat, window", (128, 128)),
                "dogs/c.png": ("dog, sofa, sofa", (256, 64))}
    for name, (caption, size) in captions.items():
        write_image(root / name, size, seed=len(name) + size[0])
        (root / name).with_suffix(".txt").write_text(caption)
    data = ImageDataset(DatasetConfig(data_dir=str(root), recursive=True, width=128, height=128,
                                      resize_mode="buckets", repeats=3))
    summary = data.summary()
    assert summary.images == {"cats": 2, "dogs": 1} and summary.total_images == 3
    assert summary.tags == {"cats": {"cat": 2, "sofa": 1, "window": 1}, "dogs": {"dog": 1, "sofa": 2}}
    assert summary.repeats == 3 and summary.buckets and summary.resolution == (128, 128)
    # the 4:1 image trains in the 256x64 bucket (same area), the square ones at 128x128
    assert summary.sizes == {(128, 128): 2, (256, 64): 1}
