"""Hypernetwork files: the exact WebUI layout, legacy keys, WebUI defaults for missing options, refusals."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from finetune_core.errors import ArtifactError
from finetune_core.formats.atomic import save_pt
from finetune_core.formats.embedding import EmbeddingFile, write_embedding
from finetune_core.formats.hypernetwork_file import (
    METADATA_KEYS,
    HypernetworkFile,
    dropout_structure_for,
    read_hypernetwork,
    write_hypernetwork,
)


def _module(size: int, hidden: float = 2.0, indices: tuple[int, int] = (0, 2), seed: int = 0) -> OrderedDict:
    gen = torch.Generator().manual_seed(size + seed)
    mid = int(size * hidden)
    return OrderedDict([
        (f"linear.{indices[0]}.weight", torch.randn(mid, size, generator=gen)),
        (f"linear.{indices[0]}.bias", torch.randn(mid, generator=gen)),
        (f"linear.{indices[1]}.weight", torch.randn(size, mid, generator=gen)),
        (f"linear.{indices[1]}.bias", torch.randn(size, generator=gen)),
    ])


def _file() -> HypernetworkFile:
    return HypernetworkFile(
        name="bar", layers={768: (_module(768), _module(768, seed=1)), 320: (_module(320), _module(320, seed=1))},
        step=100, activation_func="relu", sd_checkpoint="abc1234567", sd_checkpoint_name="tiny-sd1",
        optional_info="made in a test")


def test_written_layout_is_exactly_the_webui_dict(tmp_path, gate):
    path = write_hypernetwork(_file(), tmp_path / "bar.pt")
    seen = gate(path)
    assert seen <= {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch", "FloatStorage")}
    raw = torch.load(path, weights_only=True)
    assert sorted(k for k in raw if isinstance(k, int)) == [320, 768]
    assert {k for k in raw if not isinstance(k, int)} == set(METADATA_KEYS)
    pair = raw[768]
    assert isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(sd, dict) for sd in pair)
    assert list(pair[0]) == ["linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias"]
    assert pair[0]["linear.0.weight"].shape == (1536, 768) and pair[0]["linear.0.weight"].dtype == torch.float32
    expected_types = {"step": int, "name": str, "layer_structure": list, "activation_func": str, "is_layer_norm": bool,
                      "weight_initialization": str, "sd_checkpoint": str, "sd_checkpoint_name": str,
                      "activate_output": bool, "use_dropout": bool, "dropout_structure": list,
                      "last_layer_dropout": bool, "optional_info": str}
    assert {k: type(raw[k]) for k in expected_types} == expected_types
    assert raw["layer_structure"] == [1.0, 2.0, 1.0] and raw["dropout_structure"] == [0.0, 0.0, 0.0]
    assert raw["activate_output"] is False


def test_round_trip(tmp_path):
    original = _file()
    back = read_hypernetwork(write_hypernetwork(original, tmp_path / "bar.pt"))
    assert back.sizes == [320, 768]
    for size in original.layers:
        for a, b in zip(original.layers[size], back.layers[size]):
            assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    fields = ("name", "step", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
              "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout", "last_layer_dropout",
              "optional_info")
    assert {f: getattr(back, f) for f in fields} == {f: getattr(original, f) for f in fields}


def test_legacy_file_gets_key_fix_and_webui_defaults(tmp_path):
    legacy = OrderedDict((k.replace("linear.0.", "linear1.").replace("linear.2.", "linear2."), v)
                         for k, v in _module(768).items())
    save_pt({768: (legacy, legacy), "step": 7}, tmp_path / "old-style.pt")
    back = read_hypernetwork(tmp_path / "old-style.pt")
    assert list(back.layers[768][0]) == ["linear.0.weight", "linear.0.bias", "linear.1.weight", "linear.1.bias"]
    assert back.name == "old-style" and back.step == 7
    assert back.activate_output is True  # the WebUI's default for files written before the option existed
    assert back.layer_structure == [1.0, 2.0, 1.0] and back.activation_func is None
    assert back.weight_initialization == "Normal" and back.is_layer_norm is False
    assert back.use_dropout is False and back.dropout_structure == [0.0, 0.0, 0.0]


def test_dropout_defaults_follow_the_webui():
    assert dropout_structure_for([1, 2, 2, 1], use_dropout=True, last_layer_dropout=False) == [0.0, 0.3, 0.0, 0.0]
    assert dropout_structure_for([1, 2, 2, 1], use_dropout=True, last_layer_dropout=True) == [0.0, 0.3, 0.3, 0.0]
    assert dropout_structure_for([1, 2, 1], use_dropout=False, last_layer_dropout=True) == [0.0, 0.0, 0.0]


def test_stored_dropout_structure_implies_use_dropout(tmp_path):
    save_pt({768: (_module(768), _module(768)), "dropout_structure": [0.0, 0.1, 0.0]}, tmp_path / "d.pt")
    back = read_hypernetwork(tmp_path / "d.pt")
    assert back.use_dropout is True and back.dropout_structure == [0.0, 0.1, 0.0]


def test_a_stored_structure_builds_dropout_even_when_use_dropout_says_no(tmp_path):
    """The WebUI's `Hypernetwork.load` derives use_dropout from a non-zero structure and builds its Dropout
    layers from the structure; such files exist (made by other tools) and the WebUI loads them."""
    from finetune_core.methods.hypernetwork import Hypernetwork, HypernetworkConfig

    save_pt({768: (_module(768), _module(768)), "use_dropout": False, "dropout_structure": [0.0, 0.3, 0.0]},
            tmp_path / "d.pt")
    back = read_hypernetwork(tmp_path / "d.pt")
    assert back.use_dropout is True and back.dropout_structure == [0.0, 0.3, 0.0]
    modules = Hypernetwork(HypernetworkConfig(), back).pairs["768"][0].linear
    assert [type(m).__name__ for m in modules] == ["Linear", "Dropout", "Linear"]


def test_embedding_given_to_read_hypernetwork(tmp_path):
    path = write_embedding(EmbeddingFile(name="e", vectors={"clip_l": torch.zeros(1, 768)}), tmp_path / "e.pt")
    with pytest.raises(ArtifactError, match="this file is an embedding, not a hypernetwork"):
        read_hypernetwork(path)


@pytest.mark.parametrize("change, message", [
    ({"layer_structure": [2.0, 1.0]}, "start and end with 1"),
    ({"layer_structure": [1.0, 2.0, 2.0, 1.0]}, "chaining"),
    ({"dropout_structure": [0.0, 0.0]}, "as many entries"),
    ({"layers": {768: (_module(768), _module(320))}}, "chaining"),
    ({"layers": {768: (_module(768),)}}, "pair"),
    ({"layers": {768: ({"weight": torch.zeros(1)}, _module(768))}}, "linear"),
])
def test_invalid_files_are_not_written(tmp_path, change, message):
    values = {**_file().__dict__, **change}
    with pytest.raises(ArtifactError, match=message):
        write_hypernetwork(HypernetworkFile(**values), tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


def test_existing_file_refused_unless_overwrite(tmp_path):
    path = write_hypernetwork(_file(), tmp_path / "bar.pt")
    before = path.read_bytes()
    changed = _file()
    changed.step = 200
    with pytest.raises(ArtifactError, match="already exists"):
        write_hypernetwork(changed, path)
    assert path.read_bytes() == before
    write_hypernetwork(changed, path, overwrite=True)
    assert read_hypernetwork(path).step == 200


def test_truncated_file_is_refused(tmp_path):
    path = write_hypernetwork(_file(), tmp_path / "bar.pt")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ArtifactError, match="bar.pt"):
        read_hypernetwork(path)
