"""The LoRA file: kohya's flat keys round trip, the sshs hashes, refusals, and the inspector's row."""

from __future__ import annotations

import pytest
import torch

from finetune_core.errors import ArtifactError
from finetune_core.formats.inspect import inspect_file
from finetune_core.formats.lora_file import (
    NetworkFile,
    NetworkModule,
    family_of,
    model_hashes,
    read_lora,
    sniff,
    state_dict,
    write_lora,
)
from tests.conftest import data_section_hash


def _lora(down, up, alpha=None):
    tensors = {"lora_down.weight": down, "lora_up.weight": up}
    return NetworkModule("lora", tensors if alpha is None else {**tensors, "alpha": torch.tensor(alpha)})


def _file(metadata=None):
    gen = torch.Generator().manual_seed(0)
    modules = {"lora_unet_input_blocks_4_1_proj_in": _lora(torch.randn(4, 64, generator=gen),
                                                           torch.randn(64, 4, generator=gen), 2.0),
               "lora_unet_input_blocks_1_0_in_layers_2": _lora(torch.randn(2, 32, 3, 3, generator=gen),
                                                               torch.randn(32, 2, 1, 1, generator=gen), 3.0),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1": _lora(torch.randn(4, 1280, generator=gen),
                                                                     torch.randn(64, 4, generator=gen), 4.0)}
    return NetworkFile(modules, metadata if metadata is not None else
                    {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_alpha": "2.0", "ss_steps": "7",
                     "ss_output_name": "x"})


def test_round_trip_keys_alpha_and_hashes(tmp_path):
    path = write_lora(_file(), tmp_path / "x.safetensors", dtype=torch.float32)
    back = read_lora(path)
    assert set(back.modules) == set(_file().modules)
    for name, module in _file().modules.items():
        assert back.modules[name].kind == "lora" and set(back.modules[name].tensors) == set(module.tensors)
        assert all(torch.equal(back.modules[name].tensors[p], t) for p, t in module.tensors.items())
        assert back.modules[name].alpha == module.alpha
    assert back.metadata["sshs_model_hash"] == data_section_hash(path)  # the WebUI's own hash of the file
    tensors = state_dict(_file(), torch.float32)
    assert (back.metadata["sshs_model_hash"], back.metadata["sshs_legacy_hash"]) == model_hashes(tensors, {})
    assert sniff(tensors) and not sniff({**tensors, "bundle_emb.x.string_to_param.*": torch.zeros(1)})
    assert family_of(back) == "sdxl" and back.modules["lora_unet_input_blocks_4_1_proj_in"].scale == 0.5


def test_non_finite_values_and_foreign_keys_are_refused(tmp_path):
    bad = _file()
    bad.modules["lora_unet_input_blocks_4_1_proj_in"].tensors["lora_up.weight"][0, 0] = float("inf")
    with pytest.raises(ArtifactError, match="NaN or infinity"):
        write_lora(bad, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.hada_w1_a": torch.zeros(2, 2)},
              str(tmp_path / "odd.safetensors"))
    with pytest.raises(ArtifactError, match="hada_w1_a, lora_down.weight, which no network type"):
        read_lora(tmp_path / "odd.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
               "lora_unet_x.lora_mid.weight": torch.zeros(2, 2)}, str(tmp_path / "cp.safetensors"))
    with pytest.raises(ArtifactError, match="LoRA / LoCon module lora_unet_x has parts this trainer does not write "
                                            r"\(lora_mid.weight\)"):
        read_lora(tmp_path / "cp.safetensors")


def test_inspect_row_says_rank_alpha_modules_and_base(tmp_path):
    path = write_lora(_file(), tmp_path / "x.safetensors")
    info = inspect_file(path)
    assert (info.kind, info.family) == ("lora", "SDXL")
    text = info.describe()
    assert "LoRA / LoCon network, 3 modules (2 UNet, 1 text encoder, 1 3x3 conv)" in text
    assert "rank 2, rank 4" in text and "DoRA no" in text
    assert "alpha 2.0" in text and "base sdxl_base_v1-0" in text and "step 7" in text
