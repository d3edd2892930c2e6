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


def test_an_oversized_caption_is_cut_at_what_the_encoder_sees_and_named(tmp_path: Path, make_image):
    """A 1.2 MB caption (issue 25.2) is cut when read: lint names the file, and the tokens the encoder would see
    (the first CAPTION_TOKENS) are unchanged."""
    from finetune_core.data.captions import CAPTION_CHARS, CAPTION_TOKENS
    from finetune_core.model.tokenizer import ClipTokenizer

    make_image(tmp_path / "huge.png", (64, 64))
    words = [f"tag{i % 977}, blue" for i in range(120_000)]
    (tmp_path / "huge.txt").write_text(" ".join(words), encoding="utf-8")
    assert (tmp_path / "huge.txt").stat().st_size > 1_200_000
    report = lint_dataset(DatasetConfig(data_dir=str(tmp_path), width=64, height=64))
    row = report.rows[0]
    assert len(row.caption) <= CAPTION_CHARS
    assert any(f"longer than the {CAPTION_TOKENS} tokens" in p for p in row.problems)
    assert any("huge.txt" in w and "only its start is used" in w for w in report.warnings)
    tokenizer = ClipTokenizer()
    head = " ".join(words[:2 * CAPTION_TOKENS])
    assert tokenizer.encode(row.caption)[:CAPTION_TOKENS] == tokenizer.encode(head)[:CAPTION_TOKENS]


def test_control_characters_in_a_caption_are_removed_with_a_warning(tmp_path: Path, make_image):
    make_image(tmp_path / "a.png", (64, 64))
    (tmp_path / "a.txt").write_bytes(b"a red\x00 fox\x1b[31m")
    report = lint_dataset(DatasetConfig(data_dir=str(tmp_path), width=64, height=64))
    assert report.rows[0].caption == "a red fox [31m"
    assert any("a.txt" in w and "control characters" in w for w in report.warnings)
