"""Preview images carrying an embedding: the text chunk, and the pixel form when the chunk is stripped."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from PIL import Image

from finetune_core.errors import ArtifactError
from finetune_core.formats.embedding import EmbeddingFile, read_embedding, write_embedding_png
from finetune_core.formats.image_embedding import (
    TEXT_CHUNK_KEY,
    embed_in_pixels,
    extract_from_pixels,
    lcg_nibbles,
    read_image_data,
)


def _embedding(n: int = 3, width: int = 768) -> EmbeddingFile:
    gen = torch.Generator().manual_seed(n * width)
    return EmbeddingFile(name="foo", vectors={"clip_l": torch.randn(n, width, generator=gen)}, step=40,
                         sd_checkpoint="abc1234567", sd_checkpoint_name="tiny-sd1")


def _preview(width: int = 48, height: int = 40) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _assert_same(a: EmbeddingFile, b: EmbeddingFile) -> None:
    assert torch.equal(a.vectors["clip_l"], b.vectors["clip_l"])
    assert (a.name, a.step, a.sd_checkpoint, a.sd_checkpoint_name) == (b.name, b.step, b.sd_checkpoint,
                                                                       b.sd_checkpoint_name)


def test_png_text_chunk_round_trip(tmp_path):
    original = _embedding()
    path = write_embedding_png(original, _preview(), tmp_path / "foo-40.png")
    with Image.open(path) as image:
        data = json.loads(base64.b64decode(image.text[TEXT_CHUNK_KEY]))
    assert data["string_to_token"] == {"*": 265} and set(data["string_to_param"]["*"]) == {"TORCHTENSOR"}
    assert np.array(data["string_to_param"]["*"]["TORCHTENSOR"]).shape == (3, 768)
    _assert_same(original, read_embedding(path))


def test_pixels_alone_carry_the_embedding_when_the_chunk_is_stripped(tmp_path):
    original = _embedding(n=2, width=1024)
    path = write_embedding_png(original, _preview(), tmp_path / "foo.png")
    stripped = tmp_path / "stripped.png"
    with Image.open(path) as image:
        Image.fromarray(np.asarray(image.convert("RGB"))).save(stripped)  # no text chunk any more
    with Image.open(stripped) as image:
        assert TEXT_CHUNK_KEY not in getattr(image, "text", {})
    _assert_same(original, read_embedding(stripped))


def test_lossless_webp_carries_pixels(tmp_path):
    original = _embedding(n=1)
    path = write_embedding_png(original, _preview(), tmp_path / "foo.webp")
    _assert_same(original, read_embedding(path))


def test_pixel_layout_low_block_picture_high_block():
    preview = _preview(width=30, height=24)
    data = _embedding(n=1).to_webui_dict()
    combined = np.asarray(embed_in_pixels(preview, data))
    low_nibbles = combined & 0x0F
    black = np.flatnonzero(low_nibbles.sum(axis=(0, 2)) == 0)
    left, right = black[0], black[-1]
    assert right - left - 1 == preview.width
    assert np.array_equal(combined[:, left + 1:right], np.asarray(preview))  # the picture is pasted unchanged
    assert left == combined.shape[1] - right - 1  # both data blocks have the same width
    assert not combined[:, left].any() and not combined[:, right].any()  # separators are true black


def test_lcg_stream_matches_its_definition():
    expected, state = [], 0
    for _ in range(50):
        state = (state * 1664525 + 1013904223) & 0xFFFFFFFF
        expected.append((state % 255) % 16)
    assert lcg_nibbles(50).tolist() == expected


def test_plain_image_has_no_embedding(tmp_path):
    path = tmp_path / "plain.png"
    _preview().save(path)
    with Image.open(path) as image:
        assert extract_from_pixels(image) is None
    with pytest.raises(ArtifactError, match="without an embedding"):
        read_image_data(path)


def test_sdxl_cannot_become_an_image(tmp_path):
    sdxl = EmbeddingFile(name="xl", vectors={"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)})
    with pytest.raises(ArtifactError, match="SDXL"):
        write_embedding_png(sdxl, _preview(), tmp_path / "xl.png")
    assert not (tmp_path / "xl.png").exists()


def test_existing_image_refused_unless_overwrite(tmp_path):
    path = write_embedding_png(_embedding(), _preview(), tmp_path / "foo.png")
    before = path.read_bytes()
    with pytest.raises(ArtifactError, match="already exists"):
        write_embedding_png(_embedding(n=1), _preview(), path)
    assert path.read_bytes() == before
    write_embedding_png(_embedding(n=1), _preview(), path, overwrite=True)
    assert read_embedding(path).num_vectors == 1
