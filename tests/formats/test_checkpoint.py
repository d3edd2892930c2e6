"""Single-file LDM checkpoints: key mapping both ways, family detection, reading/writing and refusing bad files."""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile

import pytest
import torch

from finetune_core.errors import ArtifactError
from finetune_core.formats import checkpoint_keys as keys
from finetune_core.formats.checkpoint import (
    detect_family,
    diffusers_to_ldm,
    file_sha256,
    ldm_to_diffusers,
    read_state_dict,
    sniff,
    write_checkpoint,
)
from tests.conftest import read_safetensors_metadata, tiny_family_modules, tiny_overrides

FAMILIES = ("sd1", "sd2", "sdxl")


def tiny_components(family: str, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """State dicts of tiny random diffusers/transformers models with the real topology of `family`."""
    models = tiny_family_modules(family, seed)
    # Random values everywhere (biases and norms included), so a swapped key cannot go unnoticed.
    return {
        name: {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in m.state_dict().items()}
        for name, m in models.items()
    }


@pytest.fixture(scope="module", params=FAMILIES)
def family_components(request):
    return request.param, tiny_components(request.param)


def one_key(family: str, component: str, key: str, shape=(2, 2)) -> dict[str, torch.Tensor]:
    return diffusers_to_ldm({component: {key: torch.zeros(shape)}}, family)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize(
    "component,key,expected",
    [
        (
            "unet",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight",
        ),
        (
            "unet",
            "down_blocks.1.resnets.0.conv_shortcut.weight",
            "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        ),
        ("unet", "down_blocks.2.downsamplers.0.conv.bias", "model.diffusion_model.input_blocks.9.0.op.bias"),
        ("unet", "up_blocks.0.upsamplers.0.conv.weight", "model.diffusion_model.output_blocks.2.1.conv.weight"),
        (
            "unet",
            "up_blocks.3.resnets.2.time_emb_proj.weight",
            "model.diffusion_model.output_blocks.11.0.emb_layers.1.weight",
        ),
        ("unet", "mid_block.resnets.1.norm2.bias", "model.diffusion_model.middle_block.2.out_layers.0.bias"),
        ("unet", "time_embedding.linear_2.weight", "model.diffusion_model.time_embed.2.weight"),
        ("unet", "conv_out.bias", "model.diffusion_model.out.2.bias"),
        ("vae", "decoder.up_blocks.0.resnets.2.conv1.weight", "first_stage_model.decoder.up.3.block.2.conv1.weight"),
        ("vae", "decoder.up_blocks.2.upsamplers.0.conv.weight", "first_stage_model.decoder.up.1.upsample.conv.weight"),
        (
            "vae",
            "encoder.down_blocks.1.resnets.0.conv_shortcut.bias",
            "first_stage_model.encoder.down.1.block.0.nin_shortcut.bias",
        ),
        ("vae", "decoder.mid_block.resnets.1.norm1.weight", "first_stage_model.decoder.mid.block_2.norm1.weight"),
    ],
)
def test_worked_examples_of_methods_7_6(family, component, key, expected):
    assert list(one_key(family, component, key)) == [expected]


def test_sd1_text_encoder_is_a_pure_prefix():
    key = "text_model.encoder.layers.11.mlp.fc2.bias"
    assert list(one_key("sd1", "text_encoder", key)) == ["cond_stage_model.transformer." + key]
    assert list(one_key("sdxl", "text_encoder", key)) == ["conditioner.embedders.0.transformer." + key]


def test_sdxl_upsampler_follows_the_attention():
    assert list(one_key("sdxl", "unet", "up_blocks.0.upsamplers.0.conv.weight")) == [
        "model.diffusion_model.output_blocks.2.2.conv.weight"
    ]
    assert list(one_key("sdxl", "unet", "up_blocks.1.upsamplers.0.conv.bias")) == [
        "model.diffusion_model.output_blocks.5.2.conv.bias"
    ]
    assert list(one_key("sdxl", "unet", "add_embedding.linear_2.weight")) == [
        "model.diffusion_model.label_emb.0.2.weight"
    ]
    assert list(one_key("sdxl", "unet", "down_blocks.1.attentions.1.proj_in.weight")) == [
        "model.diffusion_model.input_blocks.5.1.proj_in.weight"
    ]


def test_vae_attention_becomes_1x1_conv_and_legacy_names_are_normalised():
    q = torch.randn(4, 4)
    ldm = diffusers_to_ldm(
        {
            "vae": {
                "encoder.mid_block.attentions.0.to_q.weight": q,
                "decoder.mid_block.attentions.0.proj_attn.weight": q,
                "decoder.mid_block.attentions.0.to_q.bias": q[0],
            }
        },
        "sd1",
    )
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (4, 4, 1, 1)
    assert torch.equal(ldm["first_stage_model.decoder.mid.attn_1.proj_out.weight"][:, :, 0, 0], q)
    assert ldm["first_stage_model.decoder.mid.attn_1.q.bias"].shape == (4,)
    back = ldm_to_diffusers({**ldm, "cond_stage_model.transformer.text_model.final_layer_norm.bias": q[0]}, "sd1")
    assert torch.equal(back["vae"]["decoder.mid_block.attentions.0.to_out.0.weight"], q)


def test_openclip_qkv_become_in_proj_in_order():
    d = 4
    parts = {p: torch.randn(d, d) for p in ("q_proj", "k_proj", "v_proj")}
    sd = {f"text_model.encoder.layers.5.self_attn.{p}.weight": t for p, t in parts.items()}
    ldm = diffusers_to_ldm({"text_encoder": sd}, "sd2")
    fused = ldm["cond_stage_model.model.transformer.resblocks.5.attn.in_proj_weight"]
    assert list(ldm) == ["cond_stage_model.model.transformer.resblocks.5.attn.in_proj_weight"]
    assert fused.shape == (3 * d, d)
    assert torch.equal(fused, torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]]))


def test_round_trip_diffusers_ldm_diffusers_is_bit_identical(family_components):
    family, components = family_components
    ldm = diffusers_to_ldm(components, family)
    assert detect_family(ldm) == family and sniff(ldm)
    back = ldm_to_diffusers(ldm, family)
    assert set(back) == set(components)
    for name, sd in components.items():
        expected = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
        assert set(back[name]) == set(expected), name
        for key, value in expected.items():
            assert back[name][key].dtype == value.dtype and torch.equal(back[name][key], value), (name, key)
    again = diffusers_to_ldm(back, family)
    assert set(again) == set(ldm) and all(torch.equal(again[k], ldm[k]) for k in ldm)


def test_ldm_prefixes_per_family(family_components):
    family, components = family_components
    ldm = diffusers_to_ldm(components, family)
    text_prefix = {
        "sd1": "cond_stage_model.transformer.text_model.",
        "sd2": "cond_stage_model.model.",
        "sdxl": "conditioner.embedders.",
    }[family]
    allowed = ("model.diffusion_model.", "first_stage_model.", text_prefix)
    assert all(k.startswith(allowed) for k in ldm)
    if family != "sd1":
        te = "text_encoder_2" if family == "sdxl" else "text_encoder"
        prefix = "conditioner.embedders.1.model." if family == "sdxl" else "cond_stage_model.model."
        assert torch.equal(
            ldm[prefix + "positional_embedding"], components[te]["text_model.embeddings.position_embedding.weight"]
        )
        assert torch.equal(ldm[prefix + "ln_final.weight"], components[te]["text_model.final_layer_norm.weight"])
    if family == "sdxl":
        proj = components["text_encoder_2"]["text_projection.weight"]
        assert torch.equal(ldm["conditioner.embedders.1.model.text_projection"], proj.t())


def test_ldm_only_keys_are_ignored():
    components = tiny_components("sd2", seed=1)
    ldm = diffusers_to_ldm(components, "sd2")
    layer = {k.replace("resblocks.1.", "resblocks.23."): v for k, v in ldm.items() if ".resblocks.1." in k}
    extra = {
        **layer,
        "cond_stage_model.model.text_projection": torch.randn(16, 16),
        "cond_stage_model.model.logit_scale": torch.tensor(4.6),
        "alphas_cumprod": torch.rand(1000),
        "betas": torch.rand(1000),
        "model_ema.decay": torch.tensor(0.999),
        "model_ema.num_updates": torch.tensor(1),
        "model_ema.diffusion_modelconv_inweight": torch.randn(2),
    }
    back = ldm_to_diffusers({**ldm, **extra}, "sd2")
    assert set(back["text_encoder"]) == set(components["text_encoder"])
    assert not any("layers.23." in k for k in back["text_encoder"])


def test_old_sd1_keys_without_text_model_and_position_ids():
    ldm = diffusers_to_ldm(tiny_components("sd1", seed=2), "sd1")
    old = {k.replace("transformer.text_model.", "transformer."): v for k, v in ldm.items()}
    old["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    back = ldm_to_diffusers(old, "sd1")
    assert set(back["text_encoder"]) == {
        k[len("cond_stage_model.transformer.") :] for k in ldm if k.startswith("cond_stage_model.")
    }


def test_unknown_unet_key_is_named():
    ldm = diffusers_to_ldm(tiny_components("sd1", seed=3), "sd1")
    ldm["model.diffusion_model.input_blocks.13.0.weight"] = torch.zeros(1)
    with pytest.raises(ArtifactError, match="input_blocks.13.0.weight"):
        ldm_to_diffusers(ldm, "sd1")


def test_detect_family_and_refusals():
    assert detect_family(["cond_stage_model.transformer.text_model.final_layer_norm.weight"]) == "sd1"
    assert detect_family(["cond_stage_model.model.ln_final.weight"]) == "sd2"
    assert detect_family(["conditioner.embedders.0.model.ln_final.weight"]) == "sd2"  # SD2-Turbo
    assert (
        detect_family(
            [
                "conditioner.embedders.1.model.ln_final.weight",
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
            ]
        )
        == "sdxl"
    )
    with pytest.raises(ArtifactError, match="SDXL refiner"):
        detect_family(["conditioner.embedders.0.model.ln_final.weight", "model.diffusion_model.label_emb.0.0.weight"])
    with pytest.raises(ArtifactError, match="no text encoder"):
        detect_family(["model.diffusion_model.out.2.weight"])
    with pytest.raises(ArtifactError, match="lora_unet_down"):
        detect_family(["lora_unet_down.alpha"])
    assert not sniff({"string_to_param": torch.zeros(1)})


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_write_then_read(tmp_path, suffix):
    ldm = diffusers_to_ldm(tiny_components("sd1", seed=4), "sd1")
    path = write_checkpoint(ldm, tmp_path / f"model{suffix}", metadata={"modelspec.title": "tiny"})
    loaded = read_state_dict(path)
    assert set(loaded) == set(ldm) and all(torch.equal(loaded[k], ldm[k]) for k in ldm)
    if suffix == ".ckpt":
        assert not zipfile.is_zipfile(path)  # legacy serializer: a stock WebUI's check_pt accepts it
        raw = torch.load(path, weights_only=True)
        assert set(raw) == {"state_dict", "metadata"}
    else:
        assert read_safetensors_metadata(path) == {"modelspec.title": "tiny"}
    with pytest.raises(ArtifactError, match="already exists"):
        write_checkpoint(ldm, path)
    half = read_state_dict(write_checkpoint(ldm, path, overwrite=True, half=True))
    assert all(v.dtype == torch.float16 for k, v in half.items() if ldm[k].is_floating_point())
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_safetensors_tensors_are_read_into_memory_of_their_own(tmp_path):
    """Each tensor its own aligned buffer, never a view of a memory map of the file (which would keep the whole
    file resident beside any copy, and at unaligned addresses send CPU kernels down other paths)."""
    import safetensors.torch

    tensors = {f"t{i}": torch.randn(3 + i, 5) for i in range(6)}  # odd sizes: every offset after the first unaligned
    tensors |= {"half": torch.randn(7).half(), "bf": torch.randn(3).bfloat16(), "flag": torch.tensor([True, False]),
                "ids": torch.arange(5), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    loaded = read_state_dict(path)
    assert set(loaded) == set(tensors)
    for key, value in loaded.items():
        assert value.dtype == tensors[key].dtype and torch.equal(value, tensors[key]), key
        assert value.untyped_storage().nbytes() == value.nbytes, f"{key} shares a storage"
        assert value.data_ptr() % 64 == 0 or value.numel() == 0, f"{key} is at an unaligned address"


def test_write_refuses_bad_names_and_metadata(tmp_path):
    with pytest.raises(ArtifactError, match=r"\.safetensors or \.ckpt"):
        write_checkpoint({"a": torch.zeros(1)}, tmp_path / "model.bin")
    with pytest.raises(ArtifactError, match="metadata must be text"):
        write_checkpoint({"a": torch.zeros(1)}, tmp_path / "m.safetensors", metadata={"steps": 5})


def test_truncated_and_foreign_files_are_refused(tmp_path):
    ldm = {"model.diffusion_model.out.2.weight": torch.randn(64, 64)}
    for suffix in (".safetensors", ".ckpt"):
        good = write_checkpoint(ldm, tmp_path / f"good{suffix}")
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        with pytest.raises(ArtifactError, match="cut"):
            read_state_dict(cut)
    text = tmp_path / "notes.ckpt"
    text.write_text("these are my notes, not a model\n")
    with pytest.raises(ArtifactError, match="notes.ckpt"):
        read_state_dict(text)
    with pytest.raises(ArtifactError, match=r"\.safetensors or \.ckpt"):
        read_state_dict(tmp_path / "model.onnx")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["pickle", "torch-legacy", "torch-zip"])
def test_pickle_that_runs_code_is_refused_and_not_executed(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": _Exploit(marker)}}
    if how == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=how == "torch-zip")
    with pytest.raises(ArtifactError, match="evil.ckpt was refused"):
        read_state_dict(path)
    assert not marker.exists()


def test_safetensors_without_sd_keys(tmp_path):
    path = write_checkpoint({"lora_unet_down_blocks_0.alpha": torch.tensor(1.0)}, tmp_path / "lora.safetensors")
    state_dict = read_state_dict(path)
    assert not sniff(state_dict)
    with pytest.raises(ArtifactError, match="not a Stable Diffusion checkpoint"):
        detect_family(state_dict)


def test_non_tensor_payload_is_refused(tmp_path):
    path = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ArtifactError, match="not a dictionary"):
        read_state_dict(path)


@pytest.mark.parametrize(
    "family,expected",
    [
        (
            "sd1",
            {
                "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
                "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
                "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
                "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias": (768,),
            },
        ),
        (
            "sd2",
            {
                "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
                "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
                "cond_stage_model.model.positional_embedding": (77, 1024),
            },
        ),
        (
            "sdxl",
            {
                "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
                "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
                "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
                "conditioner.embedders.1.model.text_projection": (1280, 1280),
                "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_bias": (3840,),
            },
        ),
    ],
)
def test_full_size_layout_on_meta_tensors(family, expected):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from finetune_core.model.configs import load_config

    with torch.device("meta"):  # real shapes, no memory
        models = {
            "unet": UNet2DConditionModel.from_config(load_config(family, "unet")),
            "vae": AutoencoderKL.from_config(load_config(family, "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(load_config(family, "text_encoder"))),
        }
        if family == "sdxl":
            config = CLIPTextConfig.from_dict(load_config(family, "text_encoder_2"))
            models["text_encoder_2"] = CLIPTextModelWithProjection(config)
    components = {n: m.state_dict() for n, m in models.items()}
    ldm = diffusers_to_ldm(components, family)
    assert {k: tuple(ldm[k].shape) for k in expected} == expected
    back = ldm_to_diffusers(ldm, family)
    assert {n: set(sd) for n, sd in back.items()} == {n: set(sd) for n, sd in components.items()}


def test_diffusers_own_single_file_converters_read_what_we_write(family_components):
    """An independent oracle: diffusers' single-file converters (how that library reads the LDM layout) turn our
    LDM state dict back into exactly the weights it came from."""
    from diffusers.loaders import single_file_utils as oracle


    family, components = family_components
    configs = tiny_overrides(family)
    ldm = diffusers_to_ldm(components, family)
    read = {"unet": oracle.convert_ldm_unet_checkpoint(ldm, configs["unet"]),
            "vae": oracle.convert_ldm_vae_checkpoint(ldm, configs["vae"])}
    text = keys.TEXT_PREFIXES[family]
    modules = tiny_family_modules(family)
    for name, (prefix, kind) in text.items():
        if kind == "hf":
            read[name] = oracle.convert_ldm_clip_checkpoint(ldm, remove_prefix=prefix)
        else:
            read[name] = oracle.convert_open_clip_checkpoint(modules[name], ldm, prefix=prefix)
    for name, sd in components.items():
        expected = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
        got = {k: v for k, v in read[name].items() if not k.endswith("position_ids")}
        assert set(got) == set(expected), (name, sorted(set(got) ^ set(expected))[:4])
        for key, value in expected.items():
            assert torch.equal(got[key].reshape(value.shape), value), (name, key)


def test_round_trip_ldm_diffusers_ldm_is_tensor_equal_but_for_what_diffusers_drops(family_components):
    """From the LDM side: every key comes back bit-identical except the documented SD2 exceptions (OpenCLIP's last
    layer, text_projection and logit_scale, which SD2 never uses) and the LDM-only schedule buffers and EMA."""
    family, components = family_components
    ldm = diffusers_to_ldm(components, family)
    extra = {"alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.999)}
    if family == "sd2":
        extra.update({k.replace("resblocks.1.", "resblocks.23."): v.clone() for k, v in ldm.items()
                      if ".resblocks.1." in k})
        extra["cond_stage_model.model.text_projection"] = torch.randn(16, 16)
        extra["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    back = diffusers_to_ldm(ldm_to_diffusers({**ldm, **extra}, family), family)
    assert set(back) == set(ldm)
    assert all(back[k].dtype == ldm[k].dtype and torch.equal(back[k], ldm[k]) for k in ldm)


def test_over_source_carries_every_untrained_entry_exactly(tmp_path):
    from finetune_core.formats.checkpoint import over_source, read_tensors, tensor_shapes, webui_key

    source = {"model.diffusion_model.out.2.weight": torch.randn(4, 8), "first_stage_model.decoder.conv_in.bias":
              torch.randn(3).half(), "alphas_cumprod": torch.rand(10, dtype=torch.float64),
              "cond_stage_model.transformer.embeddings.position_ids": torch.arange(5)[None],
              "cond_stage_model.transformer.final_layer_norm.weight": torch.randn(2)}
    path = write_checkpoint(source, tmp_path / "src.safetensors")
    assert tensor_shapes(path)["model.diffusion_model.out.2.weight"] == (4, 8)
    assert set(read_tensors(path, lambda k: k.startswith("first"))) == {"first_stage_model.decoder.conv_in.bias"}
    trained = {"model.diffusion_model.out.2.weight": torch.zeros(4, 8).half(),
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(2)}
    assert webui_key("cond_stage_model.transformer.final_layer_norm.weight") in trained
    merged = over_source(trained, path)
    # the old-style text key is replaced by the trained new-style one; everything else is as stored
    assert set(merged) == {*source, *trained} - {"cond_stage_model.transformer.final_layer_norm.weight"}
    for key in ("first_stage_model.decoder.conv_in.bias", "alphas_cumprod",
                "cond_stage_model.transformer.embeddings.position_ids"):
        assert merged[key].dtype == source[key].dtype and torch.equal(merged[key], source[key])
    assert torch.equal(merged["model.diffusion_model.out.2.weight"], trained["model.diffusion_model.out.2.weight"])


def test_a_write_the_disk_has_no_room_for_is_refused_before_it_starts(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from finetune_core.errors import StorageError

    existing = write_checkpoint({"model.diffusion_model.x": torch.ones(2)}, tmp_path / "keep.safetensors")
    before = existing.read_bytes()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 1 << 20))
    for name in ("keep.safetensors", "new.ckpt"):
        with pytest.raises(StorageError, match="has 0.00 GiB free.*needs"):
            write_checkpoint({"model.diffusion_model.x": torch.zeros(1 << 20)}, tmp_path / name, overwrite=True)
    assert existing.read_bytes() == before and not (tmp_path / "new.ckpt").exists()
    assert not list(tmp_path.glob(".*.tmp"))
