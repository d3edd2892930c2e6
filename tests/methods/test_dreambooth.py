"""DreamBooth end to end on the tiny models: a checkpoint file in, a checkpoint file out with the source's every
untouched entry carried over exactly; the model learns the instance images; the model in memory is unchanged;
the prior term reaches the gradient; an interrupted and resumed run equals an uninterrupted one; bad input."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_core.errors import ArtifactError, ConfigError, DatasetError, ModelMismatchError, StorageError
from finetune_core.formats.checkpoint import read_state_dict, write_checkpoint
from finetune_core.jobs import service
from finetune_core.methods.dreambooth import METHOD, DreamBooth, DreamBoothConfig, memory_needs
from finetune_core.model.diffusers_backend import DiffusersModel
from finetune_core.model.interface import TrainingSetup
from finetune_core.model.single_file import load_single_file
from finetune_core.model.tiny import tiny_configs, tiny_spec
from finetune_core.train import objective
from finetune_core.train.control import Control
from finetune_core.train.events import StepEvent, Warning_
from tests.conftest import EXAMPLES, read_safetensors_metadata, weights_checksum
from tests.methods.prior_fixtures import instance_folder, paired_batch

TINY = ("tiny-sd1", "tiny-sd2", "tiny-sdxl")
V_YAML = 'model:\n  params:\n    parameterization: "v"\n'


def source_checkpoint(model: Any, path: Path) -> Path:
    """The model as a single-file checkpoint with what real files carry besides the weights: schedule buffers,
    EMA entries, and for SD2 OpenCLIP's last layer, text_projection and logit_scale (SD2 never uses them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() for k, v in model.ldm_state_dict((*model.trainable_modules(), "vae")).items()}
    state.update({"alphas_cumprod": model.alphas_cumprod().double(), "betas": torch.rand(1000, dtype=torch.float64),
                  "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10, dtype=torch.int),
                  "model_ema.diffusion_modelout2bias": torch.randn(4)})
    if model.family == "sd2":
        prefix = "cond_stage_model.model."
        state.update({k.replace("resblocks.1.", "resblocks.23."): v.clone() for k, v in state.items()
                      if ".resblocks.1." in k})
        state.update({prefix + "text_projection": torch.randn(1024, 1024).half(), prefix + "logit_scale":
                      torch.tensor(4.6)})
        path.with_suffix(".yaml").write_text(V_YAML)
    return write_checkpoint(state, path)


def load(path: Path, name: str) -> DiffusersModel:
    """A checkpoint written from a tiny model, loaded with the tiny architecture (`--model file` uses full size)."""
    c = load_single_file(path, configs=tiny_configs(tiny_spec(name)))
    return DiffusersModel(c.unet, c.vae, c.text_encoder, c.text_encoder_2, family=c.family,
                          prediction_type=c.prediction_type, identity=c.identity)


def request(data: Path, name: str = "mine", steps: int = 6, lr: str = "3e-4", **method: Any) -> service.TrainRequest:
    return service.TrainRequest("dreambooth", name, method,
                                {"data_dir": str(data), "width": 64, "height": 64, "latent_sampling": "deterministic"},
                                {"steps": steps, "learning_rate": lr, "preview_every": 0, "save_every": 0,
                                 "csv_every": 0, "seed": 3})


def eval_losses(model: Any, data: Path, draws: int = 8) -> torch.Tensor:
    """The instance loss at `draws` fixed (noise, timestep) pairs per image: the same draws before and after."""
    from finetune_core.data.dataset import ImageDataset
    from finetune_core.data.dataset_config import DatasetConfig

    images = ImageDataset(DatasetConfig(data_dir=str(data), width=64, height=64, latent_sampling="deterministic"),
                          lines=["a photo of sks"])
    images.prepare(model)
    latents = images.batch_of(list(range(len(images))), 0, 0).latents.repeat(draws, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, 1000, (len(latents),), generator=gen)
    alphas = model.alphas_cumprod()
    target = objective.training_target(model.prediction_type, latents, noise, t, alphas)
    with torch.no_grad():
        cond = model.encode_prompts(["a photo of sks"] * len(latents))
        pred = model.predict(objective.add_noise(latents, noise, t, alphas), t, cond)
    return objective.per_sample_mse(pred, target)


@pytest.mark.parametrize("name", TINY)
def test_learns_and_writes_a_checkpoint_over_its_source(name, tiny_model, tmp_path):
    src = source_checkpoint(tiny_model(name), tmp_path / "models" / f"base-{name}.safetensors")
    model = load(src, name)
    assert model.identity.source == str(src)
    data = instance_folder(tmp_path)
    before = weights_checksum(model)
    losses_before = eval_losses(model, data)

    result = service.train(request(data), model, service.OutputFolders.standalone(tmp_path / "out"))

    assert weights_checksum(model) == before  # the model in memory (VAE and all) is exactly as it was
    written, source = read_state_dict(result.artifacts[0]), read_state_dict(src)
    assert set(written) == set(source)
    unet = [k for k in source if k.startswith("model.diffusion_model.")]
    assert all(written[k].dtype == torch.float16 for k in unet)
    assert sum(not torch.equal(written[k], source[k]) for k in unet) > len(unet) // 2
    for key in set(source) - set(unet):  # VAE, text encoders, schedule buffers, EMA, SD2's unused layer
        assert written[key].dtype == source[key].dtype and torch.equal(written[key], source[key]), key
    yaml = result.artifacts[0].with_suffix(".yaml")
    assert (yaml in result.artifacts) == (name == "tiny-sd2")
    if name == "tiny-sd2":
        assert yaml.read_text() == V_YAML  # copied, so the WebUI builds the v-prediction model
    meta = read_safetensors_metadata(result.artifacts[0])
    assert meta["sd_checkpoint"] == model.identity.shorthash and meta["finetune_method"] == "dreambooth"
    assert meta["finetune_step"] == "6" and json.loads(meta["finetune_settings"])["instance_token"] == "sks"
    described = service.inspect(result.artifacts[0]).describe()
    assert described.startswith(f"Stable Diffusion checkpoint ({model.family.upper()})")
    assert f"made by dreambooth in 6 steps, trained on base-{name} [{model.identity.shorthash}]" in described

    trained = load(result.artifacts[0], name)
    assert (trained.family, trained.prediction_type) == (model.family, model.prediction_type)
    drop = losses_before - eval_losses(trained, data)
    # Six steps at 3e-4 lower this loss by about a fifth on every tiny family. The draws are the same before and
    # after, so the paired differences measure the training alone: their mean must be 10% of the loss and five
    # standard errors above zero (far more were seen), far beyond sample-to-sample noise.
    assert drop.mean() > 0.1 * losses_before.mean(), drop
    assert drop.mean() > 5 * drop.std() / len(drop) ** 0.5, drop


def test_the_class_term_reaches_the_gradient(tiny_model):
    """loss = instance + λ·class: the UNet's gradient moves with λ, linearly, by exactly the class sample's own
    gradient (the most used DreamBooth extension computes the prior loss and never adds it)."""
    model = tiny_model("tiny-sd1")
    config = DreamBoothConfig(prior_preservation=True, class_prompt="a photo of a ball")
    batch = paired_batch(model, [False, True])
    grads = {}
    with model.training_session(TrainingSetup(("unet",))):
        params = list(model.trainable_modules()["unet"].parameters())

        def gradient(loss: torch.Tensor) -> torch.Tensor:
            for p in params:
                p.grad = None
            loss.backward()
            return torch.cat([p.grad.flatten() for p in params])

        for weight in (0.0, 1.0, 2.0):
            method = DreamBooth(model, dataclasses.replace(config, prior_loss_weight=weight), "x")
            grads[weight] = gradient(method.loss(model, batch))
        pred = model.predict(batch.noisy_latents, batch.timesteps, model.encode_prompts(batch.prompts))
        alone = gradient(objective.weighted_mse(pred[1:], batch.target[1:]))  # the class sample's own loss
    step = grads[1.0] - grads[0.0]
    assert step.abs().max() > 1e-3 * grads[0.0].abs().max()  # the class term is really there
    torch.testing.assert_close(grads[2.0] - grads[1.0], step, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(step, alone, rtol=1e-4, atol=1e-7)


def test_interrupted_and_resumed_equals_uninterrupted(tiny_model, tmp_path):
    """Prior preservation, EMA, the text encoder for the first 2 steps and the resume state, all at once."""
    model = tiny_model("tiny-sd1")
    data = instance_folder(tmp_path)
    settings = {"prior_preservation": True, "class_prompt": "a photo of a ball", "class_images": 2,
                "class_steps": 2, "class_data_dir": str(tmp_path / "classes"), "ema_decay": 0.9,
                "train_text_encoder": True, "text_encoder_steps": 2, "text_encoder_lr": "1e-4",
                "keep_resume_state": True, "save_precision": "fp32"}
    sgd = {"optimizer": "sgd", "momentum": 0.9}  # a momentum buffer to restore, cheaper than Adam's two moments
    first_request = dataclasses.replace(request(data, steps=3, **settings), train_settings={
        **request(data, steps=3).train_settings, **sgd})
    whole = service.train(first_request, model, service.OutputFolders.standalone(tmp_path / "a"))
    control = Control()

    def stop_at_two(event: Any) -> None:
        if isinstance(event, StepEvent) and event.step == 2:
            control.interrupt()
    folders = service.OutputFolders.standalone(tmp_path / "b")
    first = service.train(first_request, model, folders, on_event=stop_at_two, control=control)
    assert first.interrupted and first.step == 2
    resumed = service.train(service.TrainRequest("dreambooth", "mine", resume_run=str(first.run_dir)), model, folders)
    assert resumed.step == 3 and not resumed.interrupted
    a, b = read_state_dict(whole.artifacts[0]), read_state_dict(resumed.artifacts[0])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ema = read_safetensors_metadata(resumed.artifacts[0])["finetune_ema"]
    assert ema == "true"


class Sampler:
    """A stand-in for the host's sampler: counts the images asked for, grey images of the asked size."""

    def __init__(self) -> None:
        self.made = 0

    def __call__(self, request: Any) -> list[Any]:
        from PIL import Image

        self.made += len(request.prompts)
        return [Image.new("RGB", (request.width, request.height), (90, 90, 90)) for _ in request.prompts]


def test_class_images_are_reused_when_their_settings_match_and_made_again_when_not(tmp_path):
    from types import SimpleNamespace

    from finetune_core.methods.prior_preservation import PriorPreservationSettings, generate_class_images
    from finetune_core.model.interface import ModelIdentity
    from finetune_core.train.method import PrepareContext

    folder = tmp_path / "classes"
    settings = PriorPreservationSettings(prior_preservation=True, class_prompt="a ball", class_images=3,
                                         class_batch_size=2, class_data_dir=str(folder), class_width=64,
                                         class_height=64)
    model: Any = SimpleNamespace(identity=ModelIdentity("base", "0123456789"))
    sampler, phases = Sampler(), []

    def context() -> PrepareContext:
        return PrepareContext(model, tmp_path, sampler, lambda what, done, total: phases.append((what, done, total)))

    assert len(generate_class_images(context(), settings)) == 3 and sampler.made == 3
    assert phases[-1] == (f"class images into {folder}", 3, 3)  # says where they go
    assert generate_class_images(context(), settings) == [] and sampler.made == 3  # the manifest matches
    other = dataclasses.replace(settings, class_cfg_scale=5.0)
    assert len(generate_class_images(context(), other)) == 3 and sampler.made == 6  # new settings, new images
    model.identity = ModelIdentity("base", "9999999999")  # another model makes its own
    shutil.copy(EXAMPLES / "ball-01.png", folder / "mine.png")  # ... but the user's own image counts
    assert len(generate_class_images(context(), settings)) == 2 and sampler.made == 8
    assert len(list(folder.glob("*.png"))) == 3 + 3 + 2 + 1  # nothing was deleted

    def interrupt(what: str, done: int, total: int) -> None:
        if done:
            raise KeyboardInterrupt

    stopped = dataclasses.replace(settings, class_seed=9)
    with pytest.raises(KeyboardInterrupt):
        generate_class_images(PrepareContext(model, tmp_path, sampler, interrupt), stopped)
    assert len(generate_class_images(context(), stopped)) == 0  # the first batch of two plus mine.png: three


def test_bad_input_is_refused_before_anything_is_written(tmp_path, tiny_model):
    data = instance_folder(tmp_path)
    folders = service.OutputFolders.standalone(tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="is empty"):
        service.validate_request(request(empty), folders)
    with pytest.raises(ConfigError, match="class prompt is empty"):
        service.validate_request(request(data, prior_preservation=True), folders)
    with pytest.raises(ConfigError, match="class image count is 0"):
        service.validate_request(request(data, prior_preservation=True, class_prompt="a ball", class_images=0),
                                 folders)
    classes = tmp_path / "classes"
    classes.mkdir()
    shutil.copy(EXAMPLES / "ball-01.png", classes / "good.png")
    (classes / "broken.png").write_bytes(b"no image")
    prior = {"prior_preservation": True, "class_prompt": "a ball", "class_data_dir": str(classes)}
    with pytest.raises(DatasetError, match="cannot be read: broken.png"):
        service.validate_request(request(data, **prior), folders)
    (classes / "broken.png").unlink()
    with pytest.raises(DatasetError, match=r"smaller than the training size 128x128: good.png \(96x96\)"):
        service.validate_request(dataclasses.replace(request(data, **prior), data_settings={
            "data_dir": str(data), "width": 128, "height": 128}), folders)
    folders.checkpoints.mkdir(parents=True)
    (folders.checkpoints / "taken.ckpt").write_bytes(b"a user's checkpoint")
    with pytest.raises(ArtifactError, match="taken.ckpt already exists"):
        service.validate_request(request(data, name="taken"), folders)
    assert (folders.checkpoints / "taken.ckpt").read_bytes() == b"a user's checkpoint"
    assert not folders.logs.exists()


def test_a_source_of_another_family_is_refused(tiny_model, tmp_path):
    sd2 = source_checkpoint(tiny_model("tiny-sd2"), tmp_path / "sd2.safetensors")
    model = copy.copy(tiny_model("tiny-sd1"))  # shares the modules; only its identity differs
    model.identity = dataclasses.replace(model.identity, source=str(sd2))
    with pytest.raises(ModelMismatchError, match="is SD2, but the loaded model is SD1"):
        service.train(request(instance_folder(tmp_path), steps=1), model,
                      service.OutputFolders.standalone(tmp_path / "out"))
    assert not (tmp_path / "out" / "models").exists()


def test_warnings_for_a_frozen_text_encoders_rate_and_a_rate_too_high(tiny_model, tmp_path):
    events: list[Any] = []
    result = service.train(request(instance_folder(tmp_path), steps=1, lr="0.002", text_encoder_lr="1e-6"),
                           tiny_model("tiny-sd1"), service.OutputFolders.standalone(tmp_path / "out"),
                           on_event=events.append)
    warnings = " | ".join(e.message for e in events if isinstance(e, Warning_))
    assert "text encoder learning rate is set but the text encoder is not trained" in warnings
    assert "the learning rate 0.002 is above 0.001" in warnings
    assert "no checkpoint file to carry untouched weights from" in warnings  # a model built in code
    assert result.step == 1


def test_a_full_disk_is_refused_before_training_and_before_the_final_write(tiny_model, tmp_path, monkeypatch):
    model = tiny_model("tiny-sd1")
    before = weights_checksum(model)
    data = instance_folder(tmp_path)
    folders = service.OutputFolders.standalone(tmp_path / "out")
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    full = {"now": True}
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 40, 1 << 40, 1 << 20) if full["now"] else real(p))
    with pytest.raises(StorageError, match="free"):
        service.train(request(data, steps=2), model, folders)
    assert not (tmp_path / "out").exists() or not list(folders.checkpoints.glob("*"))
    full["now"] = False

    def fill_the_disk(event: Any) -> None:
        if isinstance(event, StepEvent):
            full["now"] = True
    with pytest.raises(StorageError, match="needs"):
        service.train(request(data, steps=2), model, folders, on_event=fill_the_disk)
    assert not list(folders.checkpoints.glob("*.safetensors")) and not list(folders.checkpoints.glob(".*"))
    assert weights_checksum(model) == before


def test_memory_needs_follow_the_settings(tiny_model):
    model = tiny_model("tiny-sdxl")
    modules = model.trainable_modules()
    unet = sum(p.numel() for p in modules["unet"].parameters())
    encoders = sum(p.numel() for n in ("text_encoder", "text_encoder_2") for p in modules[n].parameters())
    plain = memory_needs(model, DreamBoothConfig())
    assert plain.trainable == unet
    full_config = DreamBoothConfig(train_text_encoder=True, ema_decay=0.999, prior_preservation=True,
                                   class_prompt="a ball")
    assert memory_needs(model, full_config).trainable == unet + encoders
    # the doubled batch and the text encoders are the memory measurement's questions to the method
    assert METHOD.pairs_class_images(full_config) and not METHOD.pairs_class_images(DreamBoothConfig())
    assert METHOD.trains_text_encoders(full_config) and not METHOD.trains_text_encoders(DreamBoothConfig())
    fp32 = memory_needs(model, DreamBoothConfig(save_precision="fp32"))
    assert fp32.artifact_bytes - plain.artifact_bytes == 2 * unet  # the trained weights in 4 bytes, not 2


def test_the_cli_refuses_bad_settings_in_one_sentence(tmp_path, capsys):
    from finetune_core.cli import main

    code = main(["train", "dreambooth", "--model", "tiny-sd1", "--name", "x", "--data", str(EXAMPLES),
                 "--prior-preservation", "--class-images", "0", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "class prompt is empty" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value, message", [
    ("class_images", 100_000, "use at most 10000"), ("class_steps", 100_000, "class_steps must be from 1 to 150"),
    ("class_batch_size", 100_000, "class_batch_size must be from 1 to 64"),
    ("class_cfg_scale", 1e9, "class_cfg_scale must be from 0 to 30")])
def test_prior_preservation_sizes_are_bounded_with_the_request(field, value, message):
    from finetune_core.errors import ConfigError
    from finetune_core.methods.dreambooth import DreamBoothConfig

    config = DreamBoothConfig(prior_preservation=True, class_prompt="a dog", **{field: value})
    with pytest.raises(ConfigError, match=message):
        config.validate()
