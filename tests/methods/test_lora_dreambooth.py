"""LoRA's DreamBooth mode on the tiny SD1 model: class images made by the host's sampler before step 1 (DreamBooth's
folder and manifest) and reused by the next run; instance and class samples in one batch; the base bit-identical
after; the prior term's gradient in the UNet and text encoder adapters; an exact resume; and every DreamBooth-mode
bad input refused in one sentence by the tab, the CLI and the REST API before any model loads."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from finetune_core.errors import ConfigError, FinetuneError
from finetune_core.formats.lora_file import read_lora
from finetune_core.jobs import service
from finetune_core.methods import METHODS
from finetune_core.methods.lora import Lora, LoraConfig, build, memory_needs
from finetune_core.model.interface import TrainingSetup
from finetune_core.train import objective
from finetune_core.train.control import Control
from finetune_core.train.events import StepEvent
from tests.conftest import EXAMPLES, rest_client, weights_checksum
from tests.methods.prior_fixtures import instance_folder, paired_batch

PRIOR = {"prior_preservation": True, "class_prompt": "a photo of a ball", "class_images": 2, "class_steps": 2,
         "class_batch_size": 2}


def request(data: Path, name: str = "ball", steps: int = 2, train: dict | None = None,
            **method: Any) -> service.TrainRequest:
    return service.TrainRequest("lora", name, {"rank": 4, "alpha": 4.0, "instance_prompt": "a photo of [name] ball",
                                               "instance_token": "sks", **method},
                                {"data_dir": str(data), "width": 64, "height": 64},
                                {"steps": steps, "learning_rate": "1e-3", "preview_every": 0, "save_every": 0,
                                 "csv_every": 0, "seed": 3, **(train or {})})


def test_class_images_are_made_once_then_reused_and_paired_with_the_instances(tiny_model, tmp_path, monkeypatch):
    model = tiny_model("tiny-sd1")
    before = weights_checksum(model)
    data = instance_folder(tmp_path)
    folders = service.OutputFolders.standalone(tmp_path / "out")
    sampled: list[int] = []
    real_sample = model.sample
    monkeypatch.setattr(model, "sample", lambda req, *a, **k: sampled.append(len(req.prompts)) or
                        real_sample(req, *a, **k))
    prompts: list[list[str]] = []
    real_loss = Lora.loss
    monkeypatch.setattr(Lora, "loss", lambda self, m, batch: prompts.append(list(batch.prompts)) or
                        real_loss(self, m, batch))

    first = service.train(request(data, **PRIOR), model, folders)

    classes = folders.logs / "lora" / "class_images" / "a_photo_of_a_ball"  # DreamBooth's layout, LoRA's logs
    assert sampled == [2] and len(list(classes.glob("*.png"))) == 2
    manifest = json.loads((classes / "class_images.json").read_text())
    assert json.dumps(manifest).count("a photo of a ball") >= 1
    assert prompts and all(p == ["a photo of sks ball", "a photo of a ball"] for p in prompts)  # one pass, both
    assert read_lora(first.artifacts[0]).metadata["ss_num_reg_images"] == "2"
    assert weights_checksum(model) == before  # the base, bit for bit

    second = service.train(request(data, name="again", **PRIOR), model, folders)
    assert second.step == 2 and sampled == [2]  # the manifest matched: nothing made again
    assert len(list(classes.glob("*.png"))) == 2
    assert weights_checksum(model) == before


def test_captioned_mode_is_the_default_and_pairs_nothing(tiny_model, tmp_path):
    config = LoraConfig()
    assert not config.prior_preservation and config.instance_prompt == config.instance_token == ""
    assert memory_needs(tiny_model("tiny-sd1"), config).trainable > 0
    assert not METHODS["lora"].pairs_class_images(config)  # the memory measurement doubles no batch
    assert METHODS["lora"].pairs_class_images(LoraConfig(prior_preservation=True, class_prompt="a ball"))
    data = METHODS["lora"].data(config, _data_config(tmp_path), "mylora")
    assert type(data).__name__ == "ImageDataset"


def _data_config(tmp_path: Path) -> Any:
    from finetune_core.data.dataset_config import DatasetConfig

    return DatasetConfig(data_dir=str(instance_folder(tmp_path)), width=64, height=64)


def test_the_class_term_reaches_the_adapters(tiny_model, tmp_path):
    """loss = instance + λ·class: every adapter's gradient (UNet and text encoder) moves linearly with λ, by exactly
    the class sample's own gradient, from one pass over both samples."""
    model = tiny_model("tiny-sd1")
    config = LoraConfig(rank=4, train_text_encoder=True, prior_preservation=True, class_prompt="a photo of a ball")
    method = build(model, "x", config, tmp_path, 0)
    with torch.no_grad():
        for adapter in method.network.by_name().values():
            adapter.weights["lora_up__weight"].normal_(std=0.05)  # as after some training: `down` gets a gradient too
    batch = paired_batch(model, [False, True])
    groups = {g.name: g.params for g in method.trainable_parameters(model)}
    assert set(groups) == {"lora_unet", "lora_text_encoder"}
    params = [p for ps in groups.values() for p in ps]

    def gradient(loss: torch.Tensor) -> torch.Tensor:
        for p in params:
            p.grad = None
        loss.backward()
        return torch.cat([p.grad.flatten() for p in params])

    grads = {}
    with model.training_session(TrainingSetup(())), method.training_context(model):
        for weight in (0.0, 1.0, 2.0):
            method.config = dataclasses.replace(config, prior_loss_weight=weight)
            grads[weight] = gradient(method.loss(model, batch))
        alone = gradient(objective.weighted_mse(method.predict(model, batch)[1:], batch.target[1:]))
    step = grads[1.0] - grads[0.0]
    sizes = [sum(p.numel() for p in groups[name]) for name in groups]
    for part in step.split(sizes):  # the class term reaches the UNet's adapters and the text encoder's
        assert part.abs().max() > 1e-4 * grads[0.0].abs().max()
    torch.testing.assert_close(grads[2.0] - grads[1.0], step, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(step, alone, rtol=1e-4, atol=1e-7)


def test_interrupted_and_resumed_equals_uninterrupted(tiny_model, tmp_path):
    model = tiny_model("tiny-sd1")
    data = instance_folder(tmp_path)
    settings = {**PRIOR, "class_data_dir": str(tmp_path / "classes"), "train_text_encoder": True}
    train = {"save_every": 2, "optimizer": "sgd", "momentum": 0.9}
    whole = service.train(request(data, steps=4, train=train, **settings), model,
                          service.OutputFolders.standalone(tmp_path / "a"))
    control = Control()

    def stop_at_two(event: Any) -> None:
        if isinstance(event, StepEvent) and event.step == 2:
            control.interrupt()

    folders = service.OutputFolders.standalone(tmp_path / "b")
    first = service.train(request(data, steps=4, train=train, **settings), model, folders, on_event=stop_at_two,
                          control=control)
    assert first.interrupted and first.step == 2
    resumed = service.train(service.TrainRequest("lora", "ball", resume_run=str(first.run_dir), overwrite=True),
                            model, folders)
    assert resumed.step == 4 and not resumed.interrupted
    a, b = read_lora(whole.artifacts[0]), read_lora(resumed.artifacts[0])
    assert set(a.modules) == set(b.modules)
    assert all(torch.equal(a.modules[k].tensors[p], b.modules[k].tensors[p]) for k in a.modules
               for p in a.modules[k].tensors)
    assert any(bool(m.tensors["lora_up.weight"].any()) for m in a.modules.values())  # it trained


def test_an_unknown_class_sampler_is_refused_before_class_images_are_made(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="class image sampler 'Nope' is not available here"):
        service.train(request(instance_folder(tmp_path), **PRIOR, class_sampler="Nope"), tiny_model("tiny-sd1"),
                      service.OutputFolders.standalone(tmp_path / "out"))
    assert not list((tmp_path / "out").rglob("*.png"))


# --- bad input: the same sentence in the tab, the CLI and the REST API, before any model loads ---------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Instance images, a class folder with an unreadable image, one with a too small image, a file in the way."""
    root = tmp_path_factory.mktemp("lora-db")
    instance_folder(root)
    (root / "broken").mkdir()
    shutil.copy(EXAMPLES / "ball-01.png", root / "broken" / "good.png")
    (root / "broken" / "broken.png").write_bytes(b"no image")
    (root / "small").mkdir()
    Image.new("RGB", (32, 32), (50, 50, 50)).save(root / "small" / "small.png")
    (root / "a-file").write_text("in the way")
    return root


# (id, method settings, CLI flags, the sentence)
BAD = [
    ("no class prompt", {"prior_preservation": True}, ["--prior-preservation"], "class prompt is empty"),
    ("no class images", {"prior_preservation": True, "class_prompt": "a ball", "class_images": 0},
     ["--prior-preservation", "--class-prompt", "a ball", "--class-images", "0"], "class image count is 0"),
    ("token in the class prompt", {"prior_preservation": True, "class_prompt": "a [name] ball"},
     ["--prior-preservation", "--class-prompt", "a [name] ball"], r"class prompt contains \[name\]"),
    ("negative prior weight", {"prior_preservation": True, "class_prompt": "a ball", "prior_loss_weight": -1.0},
     ["--prior-preservation", "--class-prompt", "a ball", "--prior-loss-weight", "-1"],
     "prior_loss_weight must be 0 or more"),
    ("unreadable own class image", {"prior_preservation": True, "class_prompt": "a ball", "class_data_dir": "{broken}"},
     ["--prior-preservation", "--class-prompt", "a ball", "--class-data-dir", "{broken}"],
     "cannot be read: broken.png"),
    ("too small own class image", {"prior_preservation": True, "class_prompt": "a ball", "class_data_dir": "{small}"},
     ["--prior-preservation", "--class-prompt", "a ball", "--class-data-dir", "{small}"],
     r"smaller than the training size 64x64: small.png \(32x32\)"),
    ("class folder is a file", {"prior_preservation": True, "class_prompt": "a ball", "class_data_dir": "{file}"},
     ["--prior-preservation", "--class-prompt", "a ball", "--class-data-dir", "{file}"], "is a file; choose a folder"),
]


def _fill(value: Any, world: Path) -> Any:
    places = {"broken": world / "broken", "small": world / "small", "file": world / "a-file"}
    return value.format(**places) if isinstance(value, str) else value


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def _one_sentence(text: str, message: str) -> None:
    assert re.search(message, text), text
    assert "\n" not in text.strip() and "Traceback" not in text, text


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_core.model import tiny

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a refused request loaded a model")

    monkeypatch.setattr(tiny, "build_tiny", refuse)


@pytest.mark.parametrize("case", BAD, ids=lambda c: c[0])
def test_bad_input_is_refused_by_the_cli(case, world, capsys, no_model):
    from finetune_core.cli import main

    _, _, flags, message = case
    before = _snapshot(world)
    code = main(["train", "lora", "--model", "tiny-sd1", "--name", "fresh", "--data", str(world / "instances"),
                 "--width", "64", "--height", "64", "--steps", "2", *[_fill(f, world) for f in flags],
                 "--output-dir", str(world / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ")
    _one_sentence(err, message)
    assert _snapshot(world) == before


@pytest.mark.parametrize("case", BAD, ids=lambda c: c[0])
def test_bad_input_is_refused_by_the_rest_api(case, world):
    _, settings, _, message = case
    client, runner, _ = rest_client(world / "out")
    before = _snapshot(world)
    answer = client.post("/finetune/v1/train", json={
        "method": "lora", "name": "fresh", "method_settings": {k: _fill(v, world) for k, v in settings.items()},
        "data_settings": {"data_dir": str(world / "instances"), "width": 64, "height": 64},
        "train_settings": {"steps": 2}})
    assert answer.status_code == 400
    _one_sentence(answer.json()["detail"], message)
    assert runner.state().status == "idle" and _snapshot(world) == before


@pytest.mark.parametrize("case", BAD, ids=lambda c: c[0])
def test_bad_input_is_refused_by_the_tab(case, world):
    from finetune_core.hosts.job_runner import JobRunner
    from finetune_core.ui.actions import MethodActions
    from finetune_core.ui.method_tab import method_sections
    from tests.ui.conftest import FakeHost

    _, settings, _, message = case
    host = FakeHost(world / "out")
    runner = JobRunner(host, train_fn=lambda *a, **k: pytest.fail("a refused request started a job"))
    spec = METHODS["lora"]
    actions = MethodActions(host, runner, service, spec.key, spec.output_kind, method_sections(spec, service))
    values = {"method": {k: _fill(v, world) for k, v in settings.items()},
              "data": {"data_dir": str(world / "instances"), "width": 64, "height": 64}, "train": {"steps": 2}}
    before = _snapshot(world)
    with pytest.raises(FinetuneError) as refused:
        actions.train("fresh", values, False, "", None)
    _one_sentence(str(refused.value), message)  # what the tab's status line shows
    assert runner.state().status == "idle" and _snapshot(world) == before
