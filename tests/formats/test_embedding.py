"""Embedding files: every written form reads back equal, loads in a stock WebUI, and bad inputs say why."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finetune_core.errors import ArtifactError
from finetune_core.formats.atomic import save_pt
from finetune_core.formats.describe import is_embedding
from finetune_core.formats.embedding import EmbeddingFile, embedding_from_obj, read_embedding, write_embedding
from finetune_core.formats.hypernetwork_file import HypernetworkFile, write_hypernetwork


def _sd1(width: int = 768, n: int = 3) -> EmbeddingFile:
    gen = torch.Generator().manual_seed(width + n)
    return EmbeddingFile(name="foo", vectors={"clip_l": torch.randn(n, width, generator=gen)}, step=500,
                         sd_checkpoint="abc1234567", sd_checkpoint_name="tiny-sd1")


def _sdxl(n: int = 2) -> EmbeddingFile:
    gen = torch.Generator().manual_seed(7)
    return EmbeddingFile(name="xl", vectors={"clip_l": torch.randn(n, 768, generator=gen),
                                             "clip_g": torch.randn(n, 1280, generator=gen)}, step=10)


def _assert_same(a: EmbeddingFile, b: EmbeddingFile) -> None:
    assert set(a.vectors) == set(b.vectors)
    for key in a.vectors:
        assert b.vectors[key].dtype == torch.float32
        assert torch.equal(a.vectors[key], b.vectors[key])


@pytest.mark.parametrize("width", [768, 1024])
@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_pt_round_trip_and_webui_layout(tmp_path, gate, width, suffix):
    original = _sd1(width)
    original.vectors["clip_l"].requires_grad_(True)
    path = write_embedding(original, tmp_path / f"foo{suffix}")
    gate(path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert raw["string_to_token"] == {"*": 265}
    tensor = raw["string_to_param"]["*"]
    assert tensor.shape == (3, width) and tensor.dtype == torch.float32 and not tensor.requires_grad
    assert (raw["name"], raw["step"], raw["sd_checkpoint"], raw["sd_checkpoint_name"]) == (
        "foo", 500, "abc1234567", "tiny-sd1")
    back = read_embedding(path)
    _assert_same(original, back)
    assert (back.name, back.step, back.sd_checkpoint, back.sd_checkpoint_name) == ("foo", 500, "abc1234567", "tiny-sd1")


def test_safetensors_round_trip_single_tensor_with_metadata(tmp_path):
    original = _sd1()
    original.extra["method"] = "textual_inversion"
    path = write_embedding(original, tmp_path / "foo.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert list(handle.keys()) == ["emb_params"]  # exactly one tensor: the WebUI's form 3
        assert handle.metadata()["step"] == "500"
    back = read_embedding(path)
    _assert_same(original, back)
    assert (back.name, back.step, back.sd_checkpoint_name) == ("foo", 500, "tiny-sd1")
    assert back.extra == {"method": "textual_inversion"}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_sdxl_round_trip_holds_only_clip_l_and_clip_g(tmp_path, gate, suffix):
    original = _sdxl()
    path = write_embedding(original, tmp_path / f"xl{suffix}")
    if suffix == ".pt":
        gate(path)
        raw = torch.load(path, weights_only=True)
        assert set(raw) == {"clip_l", "clip_g"} and all(isinstance(v, torch.Tensor) for v in raw.values())
    back = read_embedding(path)
    _assert_same(original, back)
    assert back.is_sdxl and back.width == 2048 and back.num_vectors == 2


def test_sdxl_has_no_string_to_param_form():
    with pytest.raises(ArtifactError, match="SDXL"):
        _sdxl().to_webui_dict()


def test_diffusers_concept_and_kohya_forms(tmp_path):
    vec = torch.randn(768)
    save_pt({"<my-token>": vec}, tmp_path / "learned_embeds.bin")
    concept = read_embedding(tmp_path / "learned_embeds.bin")
    assert concept.name == "learned_embeds" and concept.vectors["clip_l"].shape == (1, 768)
    assert torch.equal(concept.vectors["clip_l"][0], vec)
    rows = torch.randn(4, 768)
    save_file({"emb_params": rows}, str(tmp_path / "kohya.safetensors"))
    kohya = read_embedding(tmp_path / "kohya.safetensors")
    assert kohya.name == "kohya" and torch.equal(kohya.vectors["clip_l"], rows) and kohya.step is None


def test_parameter_dict_in_string_to_param_is_accepted(tmp_path):
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(2, 768))})
    emb = embedding_from_obj({"string_to_param": params, "name": "old", "step": 3}, tmp_path / "old.pt")
    assert emb.name == "old" and emb.step == 3 and torch.equal(emb.vectors["clip_l"], params["*"].detach())


@pytest.mark.parametrize("obj, message", [
    ({"string_to_param": {"*": torch.zeros(1, 768), "x": torch.zeros(1, 768)}}, "exactly one tensor"),
    ({"a": torch.zeros(1, 768), "b": torch.zeros(1, 768)}, "not an embedding"),
    ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280), "name": "x"}, "not an embedding"),
    (torch.zeros(1, 768), "aesthetic"),
])
def test_foreign_objects_are_refused_with_what_was_found(tmp_path, obj, message):
    with pytest.raises(ArtifactError, match=message):
        embedding_from_obj(obj, tmp_path / "x.pt")
    assert not is_embedding(obj)


def test_hypernetwork_given_to_read_embedding(tmp_path):
    layer = OrderedDict([("linear.0.weight", torch.zeros(1536, 768)), ("linear.0.bias", torch.zeros(1536)),
                         ("linear.1.weight", torch.zeros(768, 1536)), ("linear.1.bias", torch.zeros(768))])
    path = write_hypernetwork(HypernetworkFile(name="hn", layers={768: (layer, layer)}), tmp_path / "hn.pt")
    with pytest.raises(ArtifactError, match=r"hypernetwork \(sizes 768\), not an embedding"):
        read_embedding(path)


def test_existing_file_refused_unless_overwrite(tmp_path):
    path = tmp_path / "foo.pt"
    write_embedding(_sd1(), path)
    before = path.read_bytes()
    newer = _sd1(n=5)
    with pytest.raises(ArtifactError, match="already exists"):
        write_embedding(newer, path)
    assert path.read_bytes() == before
    write_embedding(newer, path, overwrite=True)
    assert read_embedding(path).num_vectors == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foo.pt"]  # no temporary file left behind


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_files_are_refused(tmp_path, suffix):
    path = write_embedding(_sd1(), tmp_path / f"foo{suffix}")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="foo"):
        read_embedding(path)


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"string_to_param": {"*": _Exploit(str(marker))}}))
    with pytest.raises(ArtifactError, match="refused"):
        read_embedding(path)
    assert not marker.exists()


def test_invalid_vectors_are_not_written(tmp_path):
    with pytest.raises(ArtifactError, match="clip_l"):
        write_embedding(EmbeddingFile(name="x", vectors={"clip_g": torch.zeros(1, 1280)}), tmp_path / "x.pt")
    with pytest.raises(ArtifactError, match="2-D"):
        write_embedding(EmbeddingFile(name="x", vectors={"clip_l": torch.zeros(768)}), tmp_path / "x.pt")
    with pytest.raises(ArtifactError, match="different vector counts"):
        write_embedding(EmbeddingFile(name="x", vectors={"clip_l": torch.zeros(1, 768),
                                                         "clip_g": torch.zeros(2, 1280)}), tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())
