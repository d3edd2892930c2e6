"""The class image folder: a manifest keyed by the settings that made each image; the user's own images; checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from finetune_core.data.class_images import (
    MANIFEST,
    ClassFolder,
    ClassImageRequest,
    check_own_images,
    class_records,
)
from finetune_core.errors import DatasetError

REQUEST = ClassImageRequest("a photo of a dog", "", 20, 7.5, "Euler", 0, 64, 64, "model", "0123456789")


def _images(n: int, size: int = 64) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), (10 * i, 0, 0)) for i in range(n)]


def test_saved_images_are_listed_under_their_settings(tmp_path: Path) -> None:
    folder = ClassFolder(tmp_path / "dogs")
    written = folder.save(REQUEST, _images(2), first_index=3)
    assert [p.name for p in written] == [f"{REQUEST.key()}-00003.png", f"{REQUEST.key()}-00004.png"]
    assert written[0].with_suffix(".txt").read_text() == "a photo of a dog"  # its caption, for [filewords]
    manifest = json.loads((tmp_path / "dogs" / MANIFEST).read_text())
    assert manifest["sets"][REQUEST.key()]["prompt"] == "a photo of a dog"
    assert list(folder.generated(REQUEST)) == [3, 4]
    other = ClassImageRequest(**{**REQUEST.__dict__, "model_hash": "9999999999"})
    assert other.key() != REQUEST.key() and folder.generated(other) == {}
    assert folder.own_images() == []


def test_own_images_come_first_and_count(tmp_path: Path) -> None:
    folder = ClassFolder(tmp_path)
    folder.save(REQUEST, _images(3), 0)
    _images(1)[0].save(tmp_path / "mine.jpg")
    assert [p.name for p in folder.own_images()] == ["mine.jpg"]
    usable = folder.usable(REQUEST, 3)
    assert [p.name for p in usable] == ["mine.jpg", f"{REQUEST.key()}-00000.png", f"{REQUEST.key()}-00001.png"]
    records = class_records(tmp_path, usable)
    assert [r.path for r in records] == usable


def test_a_deleted_generated_image_is_no_longer_usable(tmp_path: Path) -> None:
    folder = ClassFolder(tmp_path)
    written = folder.save(REQUEST, _images(2), 0)
    written[0].unlink()
    assert list(folder.generated(REQUEST)) == [1]


def test_a_damaged_manifest_is_refused_with_advice(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(DatasetError, match="damaged.*delete it"):
        ClassFolder(tmp_path).usable(REQUEST, 1)


def test_own_images_must_be_readable_and_not_smaller_than_the_training_size(tmp_path: Path) -> None:
    _images(1, 64)[0].save(tmp_path / "ok.png")
    check_own_images(tmp_path, 64, 64)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="broken.png"):
        check_own_images(tmp_path, 64, 64)
    (tmp_path / "broken.png").unlink()
    _images(1, 32)[0].save(tmp_path / "small.png")
    with pytest.raises(DatasetError, match=r"smaller than the training size 64x64: small.png \(32x32\)"):
        check_own_images(tmp_path, 64, 64)
    check_own_images(tmp_path / "missing", 64, 64)  # a folder still to be made is fine
