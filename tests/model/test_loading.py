"""load_model: built-in names, diffusers folders, single files (wiring) and clear errors for anything else."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune_core.errors import FinetuneError
from finetune_core.model import list_builtin_models, load_model
from finetune_core.model.interface import SD2, V_PREDICTION
from finetune_core.model.tiny import tiny_components


def test_builtin_names() -> None:
    assert list_builtin_models() == ["tiny-sd1", "tiny-sd2", "tiny-sdxl"]
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
