from dataclasses import replace
from pathlib import Path

import pytest

from finetune_core.data.dataset_config import DatasetConfig
from finetune_core.data.lint import lint_dataset
from finetune_core.errors import DatasetError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "dataset"


def _count_words(text: str) -> int:
    return len(text.split())


def test_lint_reports_every_kind_of_problem(tmp_path: Path, make_image):
    make_image(tmp_path / "big.png", (128, 64))
    (tmp_path / "big.txt").write_text(", ".join(f"word{i}" for i in range(80)), encoding="utf-8")
    make_image(tmp_path / "007-tiny dot.png", (1, 1))
    (tmp_path / "broken.webp").write_bytes(b"RIFF....WEBPjunk")
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    config = DatasetConfig(data_dir=str(tmp_path), width=64, height=64, resize_mode="buckets", batch_size=3,
                           template="subject_filewords.txt")
    report = lint_dataset(config, _count_words)
    assert report.images_found == 3 and len(report.rows) == 2
    assert [p.name for p, _ in report.unreadable] == ["broken.webp"]
    assert report.missing_captions == 1 and report.too_small == 1 and report.too_long == 1
    rows = {row.path.name: row for row in report.rows}
    assert rows["007-tiny dot.png"].caption == "tiny dot" and rows["007-tiny dot.png"].caption_source == "filename"
    assert rows["007-tiny dot.png"].bucket == (64, 64) and rows["big.png"].tokens > 75
    assert any("smaller" in p for p in rows["007-tiny dot.png"].problems)
    text = report.format()
    for expected in ("3 images found", "broken.webp", "missing captions: 1", "64x64: 2", "tiny dot.png",
                     "batch size 3", "neither images nor .txt"):
        assert expected in text


def test_lint_without_token_counter_and_on_bad_folder(tmp_path: Path):
    report = lint_dataset(DatasetConfig(data_dir=str(EXAMPLES), width=64, height=64))
    assert report.images_found >= 6 and report.missing_captions == 0 and report.too_long == 0
    assert all(row.tokens is None and not row.problems for row in report.rows)
    with pytest.raises(DatasetError, match="does not exist"):
        lint_dataset(replace(DatasetConfig(), data_dir=str(tmp_path / "missing")))


def test_example_dataset_trains(fake_model):
    from finetune_core.data.dataset import ImageDataset

    dataset = ImageDataset(DatasetConfig(data_dir=str(EXAMPLES), width=64, height=64, batch_size=2,
                                         resize_mode="buckets", placeholder="ball"))
    dataset.prepare(fake_model)
    batch = dataset.get_batch(0, 0)
    assert len(batch) == 2 and "spotted orange ball" in " ".join(batch.prompts)


def test_lint_reads_utf16_and_latin1_captions_and_names_them(tmp_path: Path, make_image):
    make_image(tmp_path / "a.png", (64, 64))
    (tmp_path / "a.txt").write_bytes("a red fox, snow".encode("utf-16"))  # Notepad's "Unicode" (UTF-16 + BOM)
    make_image(tmp_path / "b.png", (64, 64))
    (tmp_path / "b.txt").write_bytes("crème brûlée".encode("cp1252"))
    make_image(tmp_path / "c.png", (64, 64))
    (tmp_path / "c.txt").write_text("plain", encoding="utf-8")
    report = lint_dataset(DatasetConfig(data_dir=str(tmp_path), width=64, height=64))
    captions = {row.path.name: row.caption for row in report.rows}
    assert captions == {"a.png": "a red fox, snow", "b.png": "crème brûlée", "c.png": "plain"}
    warning = next(w for w in report.warnings if "not UTF-8" in w)
    assert "a.txt (UTF-16)" in warning and "b.txt" in warning and "c.txt" not in warning
    assert "not UTF-8" in report.format()
