"""Loading a single-file checkpoint into diffusers components: same outputs as the models it was written from."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from finetune_core.errors import ArtifactError
from finetune_core.formats.checkpoint import diffusers_to_ldm, write_checkpoint
from finetune_core.model.interface import EPSILON, V_PREDICTION
from finetune_core.model.single_file import load_single_file, parameterization_from_yaml, probe_v_prediction
from tests.conftest import tiny_family_modules, tiny_overrides


def tiny_models(family: str, seed: int) -> dict[str, torch.nn.Module]:
    """Tiny random diffusers/transformers modules with the real topology of `family`."""
    models = tiny_family_modules(family, seed)
    with torch.no_grad():
        for model in models.values():
            for param in model.parameters():  # randomise norms and biases too, so any mix-up changes the outputs
                param.normal_(0, 0.2)
    return {name: model.eval() for name, model in models.items()}


def write_file(models, family, path):
    return write_checkpoint(diffusers_to_ldm({n: m.state_dict() for n, m in models.items()}, family), path)


def unet_output(unet, family: str) -> torch.Tensor:
    torch.manual_seed(7)
    cfg = unet.config
    x = torch.randn(1, cfg.in_channels, 8, 8)
    context = torch.randn(1, 5, cfg.cross_attention_dim)
    added = None
    if family == "sdxl":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=context, added_cond_kwargs=added).sample


def text_output(encoder) -> torch.Tensor:
    ids = torch.tensor([[0, 5, 9, 63, 2]])
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2]


@pytest.mark.parametrize(
    "family,suffix,yaml,expected",
    [
        ("sd1", ".safetensors", None, EPSILON),
        ("sd2", ".ckpt", 'model:\n  params:\n    parameterization: "v"\n', V_PREDICTION),
        ("sdxl", ".safetensors", None, EPSILON),
    ],
)
def test_loaded_models_match_the_originals(tmp_path, family, suffix, yaml, expected):
    models = tiny_models(family, seed=11)
    path = write_file(models, family, tmp_path / f"my-{family}{suffix}")
    if yaml:
        path.with_suffix(".yaml").write_text(yaml)
    loaded = load_single_file(path, configs=tiny_overrides(family))
    assert loaded.family == family and loaded.prediction_type == expected
    assert loaded.identity.name == f"my-{family}"
    assert loaded.identity.shorthash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert torch.equal(unet_output(loaded.unet, family), unet_output(models["unet"], family))
    assert torch.equal(text_output(loaded.text_encoder), text_output(models["text_encoder"]))
    with torch.no_grad():
        latent = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
        assert torch.equal(loaded.vae.decode(latent).sample, models["vae"].decode(latent).sample)
    if family == "sdxl":
        with torch.no_grad():
            ids = torch.tensor([[0, 5, 9, 63, 2]])
            assert torch.equal(loaded.text_encoder_2(ids).text_embeds, models["text_encoder_2"](ids).text_embeds)
    else:
        assert loaded.text_encoder_2 is None
    assert not any(t.is_meta for t in loaded.text_encoder.buffers())


def test_sd2_without_yaml_asks_the_unet_probe(tmp_path):
    models = tiny_models("sd2", seed=12)
    path = write_file(models, "sd2", tmp_path / "sd2.safetensors")
    loaded = load_single_file(path, configs=tiny_overrides("sd2"))
    assert loaded.prediction_type == (V_PREDICTION if probe_v_prediction(models["unet"]) else EPSILON)


class _Unet(torch.nn.Module):
    """Stands in for a UNet in the probe: returns input + shift, as eps (~0) or v (~ -x0) models would."""

    def __init__(self, shift: float):
        super().__init__()
        self.shift = shift
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"in_channels": 4, "cross_attention_dim": 16})()

    def forward(self, x, t, encoder_hidden_states):
        return type("Out", (), {"sample": x + self.shift})()


def test_probe_tells_v_from_eps():
    assert probe_v_prediction(_Unet(-1.5))
    assert not probe_v_prediction(_Unet(0.01))


@pytest.mark.parametrize(
    "text,expected",
    [
        ('    parameterization: "v"\n', V_PREDICTION),
        ("parameterization: v\n", V_PREDICTION),
        ("parameterization: eps\n", EPSILON),
        ("model:\n  target: ldm.LatentDiffusion\n", EPSILON),
        ("denoiser_config:\n  params:\n    scaling_config:\n      target: sgm.VScaling\n", V_PREDICTION),
    ],
)
def test_parameterization_from_yaml(text, expected):
    assert parameterization_from_yaml(text) == expected


def test_dtype_and_sdxl_v_marker(tmp_path):
    models = tiny_models("sdxl", seed=13)
    ldm = diffusers_to_ldm({n: m.state_dict() for n, m in models.items()}, "sdxl")
    path = write_checkpoint({**ldm, "v_pred": torch.tensor([])}, tmp_path / "vxl.safetensors")
    loaded = load_single_file(path, dtype=torch.float16, configs=tiny_overrides("sdxl"))
    assert loaded.prediction_type == V_PREDICTION
    assert all(p.dtype == torch.float16 for p in loaded.unet.parameters())


def test_missing_component_is_named(tmp_path):
    models = tiny_models("sd1", seed=14)
    ldm = diffusers_to_ldm({n: m.state_dict() for n, m in models.items() if n != "vae"}, "sd1")
    path = write_checkpoint(ldm, tmp_path / "novae.safetensors")
    with pytest.raises(ArtifactError, match=r"novae.safetensors.*without VAE"):
        load_single_file(path, configs=tiny_overrides("sd1"))


def test_wrong_architecture_names_weights(tmp_path):
    models = tiny_models("sd1", seed=15)
    path = write_file(models, "sd1", tmp_path / "sd1.safetensors")
    configs = tiny_overrides("sd1")
    configs["text_encoder"]["num_hidden_layers"] = 3
    with pytest.raises(ArtifactError, match=r"1 weights|missing \(e\.g\. text_model\.encoder\.layers\.2"):
        load_single_file(path, configs=configs)
    configs = tiny_overrides("sd1")
    configs["unet"]["cross_attention_dim"] = 24
    with pytest.raises(ArtifactError, match="do not fit the expected architecture"):
        load_single_file(path, configs=configs)


def test_not_a_checkpoint(tmp_path):
    path = write_checkpoint({"emb_params": torch.zeros(2, 16)}, tmp_path / "embedding.safetensors")
    with pytest.raises(ArtifactError, match="not a Stable Diffusion checkpoint"):
        load_single_file(path)


def test_a_previously_seen_checkpoint_is_not_hashed_again(tmp_path, monkeypatch):
    from finetune_core.formats import checkpoint, hash_cache

    monkeypatch.setenv(hash_cache.ENV_VAR, str(tmp_path / "hashes.json"))
    path = write_file(tiny_models("sd1", 0), "sd1", tmp_path / "seen.safetensors")
    calls = []
    real = checkpoint.file_sha256
    monkeypatch.setattr(checkpoint, "file_sha256", lambda p, *a: calls.append(p) or real(p, *a))
    configs = tiny_overrides("sd1")
    first = load_single_file(path, configs=configs).identity.shorthash
    assert load_single_file(path, configs=configs).identity.shorthash == first and len(calls) == 1
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: it may have been rewritten
    assert load_single_file(path, configs=configs).identity.shorthash == first and len(calls) == 2
