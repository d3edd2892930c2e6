"""load_model: built-in names, diffusers folders, single files (wiring) and clear errors for anything else."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune_core.errors import FinetuneError
from finetune_core.model import load_model
from finetune_core.model.interface import SD2, V_PREDICTION
from finetune_core.model.tiny import TINY_MODELS, tiny_components


def test_builtin_names() -> None:
    assert TINY_MODELS == ("tiny-sd1", "tiny-sd2", "tiny-sdxl")
    model = load_model("tiny-sd1")
    assert model.identity.name == "tiny-sd1" and model.family == "sd1"


@pytest.mark.parametrize("spec", ["no-such-model", "tiny-sd5"])
def test_unknown_spec_says_what_is_accepted(spec: str) -> None:
    with pytest.raises(FinetuneError, match="diffusers model folder"):
        load_model(spec)


def test_folder_without_index_and_wrong_file(tmp_path: Path) -> None:
    with pytest.raises(FinetuneError, match="model_index.json"):
        load_model(str(tmp_path))
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(FinetuneError, match="not a model file"):
        load_model(str(other))


def test_diffusers_folder_round_trip(tmp_path: Path) -> None:
    c = tiny_components("tiny-sd2")
    folder = tmp_path / "my-sd2"
    for name in ("unet", "vae", "text_encoder"):
        getattr(c, name).save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps({"unet": [], "vae": [], "text_encoder": []}))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    model = load_model(str(folder))
    assert (model.family, model.prediction_type, model.identity.name) == (SD2, V_PREDICTION, "my-sd2")
    assert len(model.identity.shorthash) == 10
    built = load_model("tiny-sd2")
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([300])
    with torch.no_grad():
        same = [m.predict(x, t, m.encode_prompts(["a cat"])) for m in (model, built)]
    torch.testing.assert_close(same[0], same[1])
    for name, param in _named_weights(model):
        assert param.data_ptr() % 64 == 0 or param.numel() == 0, f"{name} is at an unaligned address"


def _parts(model) -> dict[str, torch.nn.Module]:
    return {"unet": model.unet, "vae": model.vae, "text_encoder": model._encoders[0]}


def _named_weights(model):
    for part, module in _parts(model).items():
        yield from ((f"{part}.{n}", p) for n, p in module.named_parameters())


def test_diffusers_folder_shards_and_legacy_names(tmp_path: Path) -> None:
    """Sharded weights (an index.json) and the pre-0.14 VAE attention names load as from_pretrained loads them."""
    from safetensors.torch import load_file, save_file

    c = tiny_components("tiny-sd1")
    folder = tmp_path / "old-sd1"
    c.unet.save_pretrained(folder / "unet", max_shard_size="200KB")
    c.vae.save_pretrained(folder / "vae")
    c.text_encoder.save_pretrained(folder / "text_encoder")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in load_file(vae_file).items():
        for new, old in old_names.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        renamed[key] = value
    assert any(".query." in k for k in renamed)
    save_file(renamed, vae_file)
    (folder / "model_index.json").write_text(json.dumps({"unet": [], "vae": [], "text_encoder": []}))
    model = load_model(str(folder))
    for part, module in _parts(model).items():
        ours, theirs = module.state_dict(), getattr(c, part).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), part


def test_single_file_goes_through_load_single_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_core.model import single_file

    c = tiny_components("tiny-sd1")
    seen = []

    def fake(path, *args, **kwargs):
        seen.append(Path(path))
        return single_file.SingleFileComponents(c.spec.family, c.spec.prediction_type, c.unet, c.vae,
                                                c.text_encoder, None, c.identity)

    monkeypatch.setattr(single_file, "load_single_file", fake)
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"0")
    model = load_model(str(checkpoint))
    assert seen == [checkpoint] and model.identity == c.identity


def test_package_import_does_not_load_diffusers() -> None:
    code = ("import sys, finetune_core.model; "
            "assert not [m for m in ('diffusers', 'transformers', 'ftfy', 'regex') if m in sys.modules]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small diffusers folder saved once for the broken-folder cases."""
    c = tiny_components("tiny-sd1")
    folder = tmp_path_factory.mktemp("diffusers") / "sd1"
    for name in ("unet", "vae", "text_encoder"):
        getattr(c, name).save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps({"unet": [], "vae": [], "text_encoder": []}))
    return folder


def _truncate_weights(folder: Path) -> None:
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _empty_vae(folder: Path) -> None:
    for path in (folder / "vae").iterdir():
        path.unlink()


@pytest.mark.parametrize("damage,named", [
    (_truncate_weights, "unet"),
    (_empty_vae, "vae"),
    (lambda f: (f / "text_encoder" / "config.json").write_text("{not json"), "text_encoder"),
    (lambda f: (f / "model_index.json").write_text("{\"unet\": "), "model_index.json"),
])
def test_a_broken_diffusers_folder_names_the_component(sd1_folder: Path, tmp_path: Path, damage, named) -> None:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(sd1_folder, folder)
    damage(folder)
    with pytest.raises(FinetuneError, match=named) as info:
        load_model(str(folder))
    assert "damaged" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("device,message", [("gpu0", "not a device name"), ("meta", "does not support"),
                                            ("cuda:99", "CUDA GPU|names GPU 99")])
def test_an_unusable_device_is_refused_before_loading(device: str, message: str) -> None:
    with pytest.raises(FinetuneError, match=message):
        load_model("tiny-sd1", device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_says_so() -> None:
    with pytest.raises(FinetuneError, match="use --device cpu"):
        load_model("tiny-sd1", device="cuda")


def test_the_family_shows_before_loading_where_it_can(tmp_path: Path) -> None:
    """A request is checked against the family of the model it will train on (issue 25.15): a built-in name and a
    .safetensors header tell it without reading weights; anything else is checked when it loads."""
    from safetensors.torch import save_file

    from finetune_core.model.loading import family_before_loading

    for family, key in (("sd1", "cond_stage_model.transformer.text_model.x"), ("sd2", "cond_stage_model.model.x"),
                        ("sdxl", "conditioner.embedders.1.model.x")):
        save_file({key: torch.zeros(1), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)},
                  str(tmp_path / f"{family}.safetensors"))
        assert family_before_loading(str(tmp_path / f"{family}.safetensors")) == family
    (tmp_path / "garbage.safetensors").write_bytes(b"not a header")
    assert [family_before_loading(n) for n in TINY_MODELS] == ["sd1", "sd2", "sdxl"]
    assert family_before_loading(str(tmp_path / "garbage.safetensors")) is None  # its load says what is wrong
    assert family_before_loading(str(tmp_path)) is None  # a folder: known once loaded
