from pathlib import Path

import pytest

from finetune_core.data.scan import scan_dataset
from finetune_core.errors import DatasetError


def test_missing_folder(tmp_path: Path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nowhere")


def test_file_instead_of_folder(tmp_path: Path):
    path = tmp_path / "a.png"
    path.write_bytes(b"x")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        scan_dataset(path)


def test_empty_folder(tmp_path: Path):
    with pytest.raises(DatasetError, match="is empty"):
        scan_dataset(tmp_path)


def test_only_text_files(tmp_path: Path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DatasetError) as info:
        scan_dataset(tmp_path)
    assert f"the dataset folder {tmp_path} has no images; found 3 .txt files" in str(info.value)


def test_corrupt_image_is_skipped_and_named(tmp_path: Path, make_image):
    make_image(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = scan_dataset(tmp_path)
    assert [r.path.name for r in result.records] == ["good.png"]
    assert [p.name for p, _ in result.unreadable] == ["bad.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing on disk touched


def test_only_corrupt_images(tmp_path: Path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="bad.png"):
        scan_dataset(tmp_path)


def test_recursion_captions_and_hash(tmp_path: Path, make_image):
    make_image(tmp_path / "top.png")
    make_image(tmp_path / "sub" / "003-deep one.webp", seed=1)
    (tmp_path / ".hidden.png").write_bytes(b"junk")
    (tmp_path / "top.txt").write_text("from txt", encoding="utf-8")
    flat = scan_dataset(tmp_path)
    assert [r.path.name for r in flat.records] == ["top.png"] and not flat.unreadable
    deep = scan_dataset(tmp_path, recursive=True)
    by_name = {r.path.name: r for r in deep.records}
    assert by_name["003-deep one.webp"].caption == "deep one"
    assert by_name["003-deep one.webp"].caption_source == "filename"
    assert by_name["top.png"].caption == "from txt" and by_name["top.png"].has_caption_file
    assert by_name["top.png"].content_hash != by_name["003-deep one.webp"].content_hash


def test_empty_folder_with_subfolders_hints_at_recursion(tmp_path: Path, make_image):
    make_image(tmp_path / "sub" / "a.png")
    with pytest.raises(DatasetError, match="not searched"):
        scan_dataset(tmp_path)
    assert len(scan_dataset(tmp_path, recursive=True).records) == 1
