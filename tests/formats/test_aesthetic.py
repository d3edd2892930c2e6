"""Aesthetic embeddings: one (1, D) float32 tensor; the shipped 1-D and fp16 variants still read."""

from __future__ import annotations

import pytest
import torch

from finetune_core.errors import ArtifactError
from finetune_core.formats.aesthetic import read_aesthetic_embedding, sniff, write_aesthetic_embedding
from finetune_core.formats.atomic import save_pt


def test_write_makes_one_by_d_float32(tmp_path, gate):
    vector = torch.randn(768, dtype=torch.float64)
    path = write_aesthetic_embedding(vector, tmp_path / "style.pt")
    gate(path)
    raw = torch.load(path, weights_only=True)
    assert isinstance(raw, torch.Tensor) and raw.shape == (1, 768) and raw.dtype == torch.float32
    assert torch.equal(read_aesthetic_embedding(path)[0], vector.float())


@pytest.mark.parametrize("stored", [torch.randn(768), torch.randn(1, 768).half()])
def test_shipped_variants_read_as_one_by_d(tmp_path, stored):
    save_pt(stored, tmp_path / "shipped.pt")
    back = read_aesthetic_embedding(tmp_path / "shipped.pt")
    assert back.shape == (1, 768) and back.dtype == torch.float32
    assert torch.equal(back.reshape(-1), stored.float().reshape(-1))


def test_non_vectors_are_refused(tmp_path):
    with pytest.raises(ArtifactError, match="one vector"):
        write_aesthetic_embedding(torch.zeros(2, 768), tmp_path / "x.pt")
    with pytest.raises(ArtifactError, match="NaN"):
        write_aesthetic_embedding(torch.full((768,), float("nan")), tmp_path / "x.pt")
    save_pt({"string_to_param": {"*": torch.zeros(1, 768)}}, tmp_path / "emb.pt")
    with pytest.raises(ArtifactError, match="not an aesthetic embedding"):
        read_aesthetic_embedding(tmp_path / "emb.pt")
    assert not sniff(torch.zeros(3, 4)) and not sniff(torch.zeros(768, dtype=torch.long)) and sniff(torch.zeros(5))
