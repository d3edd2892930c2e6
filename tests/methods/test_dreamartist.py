"""DreamArtist end to end on the tiny models: guidance reaches both embeddings, it learns with and without the
reconstruction term, both files load as the WebUI loads them, nothing else changes, resume is exact, a pair
continues, and the discriminator term (a random ConvNeXt-Tiny built by timm) adds to the loss."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from finetune_core.data.data_batch import DataBatch
from finetune_core.formats.embedding import read_embedding
from finetune_core.jobs import service
from finetune_core.methods.dreamartist import (
    DreamArtist,
    DreamArtistConfig,
    create_pair,
    negative_prompt,
)
from finetune_core.methods.guidance import GuidanceScale, parse_guidance
from finetune_core.train import objective
from finetune_core.train.control import Control
from finetune_core.train.events import StepEvent, Warning_
from finetune_core.train.train_batch import TrainBatch
from tests.conftest import weights_checksum
from tests.formats.conftest import webui_gate

WIDTHS = {"tiny-sd1": {"clip_l": 768}, "tiny-sd2": {"clip_l": 1024}, "tiny-sdxl": {"clip_l": 768, "clip_g": 1280}}


def _request(data: Path, template: Path, steps: int, lr: str = "0.05", **method: object) -> service.TrainRequest:
    return service.TrainRequest(
        "dreamartist", "ballart", {"num_vectors": 2, "neg_num_vectors": 3, "init_text": "thing", **method},
        {"data_dir": str(data), "width": 64, "height": 64, "template": str(template),
         "latent_sampling": "deterministic"},
        {"steps": steps, "learning_rate": lr, "preview_every": 0, "save_every": 0, "seed": 7})


# --- guidance -----------------------------------------------------------------------------------------------------

def test_guidance_forms_parse_and_sweep_over_the_timestep() -> None:
    assert parse_guidance("3.0") == GuidanceScale(3.0, 3.0, "ln") and parse_guidance(5) == GuidanceScale(5, 5)
    assert parse_guidance(" 1.5 - 3.0 : cos2 ") == GuidanceScale(1.5, 3.0, "cos2")
    t = torch.tensor([0, 999])
    torch.testing.assert_close(parse_guidance("1-3").at(t, 1000), torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(parse_guidance("1-3:cos").at(t, 1000), torch.tensor([1.0, 3.0]))
    # cos rises fast early, cos2 slowly: at the middle timestep, cos is above linear and cos2 below
    mid = torch.tensor([500])
    linear = float(parse_guidance("1-3").at(mid, 1001))
    assert float(parse_guidance("1-3:cos").at(mid, 1001)) > linear > float(parse_guidance("1-3:cos2").at(mid, 1001))
    assert parse_guidance("1").is_one and parse_guidance("1.0-1.0").is_one and not parse_guidance("1-2").is_one


@pytest.mark.parametrize("text", ["2.5-3.5:torch.sqrt(rate)", "__import__('os')", "3,5", "-3", "0", "1-x",
                                  "3:", "1e3", ""])
def test_anything_else_is_refused_without_evaluating_it(text: str) -> None:
    from finetune_core.errors import ConfigError

    with pytest.raises(ConfigError, match="CFG scale"):
        parse_guidance(text)


def test_negative_prompt_replaces_only_the_whole_name() -> None:
    assert negative_prompt("a ballart, ballarts and ballart-neg by ballart", "ballart") == \
        "a ballart-neg, ballarts and ballart-neg by ballart-neg"


# --- gradients ----------------------------------------------------------------------------------------------------

def _batch(model, prompt: str = "a picture of ballart", n: int = 2, seed: int = 0) -> TrainBatch:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=generator)
    noise = torch.randn(n, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([200, 700][:n])
    alphas = model.alphas_cumprod()
    noisy = objective.add_noise(latents, noise, timesteps, alphas)
    target = objective.training_target(model.prediction_type, latents, noise, timesteps, alphas)
    pixels = torch.rand(n, 3, 64, 64, generator=generator) * 2 - 1
    data = DataBatch(latents, [prompt] * n, torch.tensor([[64, 64, 0, 0, 64, 64]] * n, dtype=torch.float32),
                     pixels=pixels)
    return TrainBatch(data, latents, noise, timesteps, noisy, target, alphas, data.size_cond)


def _method(model, **settings: object) -> DreamArtist:
    config = DreamArtistConfig(**{"num_vectors": 2, "neg_num_vectors": 3, **settings})
    positive, negative = create_pair(model, "ballart", config, seed=1)
    return DreamArtist(config, positive, negative)


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def test_with_guidance_both_embeddings_receive_gradients(name: str, tiny_model) -> None:
    model = tiny_model(name)
    method = _method(model, cfg_scale="1.5-4:cos")
    method.loss(model, _batch(model)).backward()
    for half in (method.positive, method.negative):
        for key, vec in half.embedding.vectors.items():
            assert vec.grad is not None and float(vec.grad.abs().sum()) > 0, (half.embedding.name, key)


def test_a_scale_of_one_trains_the_positive_alone_and_says_so(tiny_model) -> None:
    model = tiny_model("tiny-sd1")
    method = _method(model, cfg_scale="1")
    assert any("does not learn" in w for w in method.check(model))
    method.loss(model, _batch(model)).backward()
    assert method.positive.embedding.vectors["clip_l"].grad is not None
    assert method.negative.embedding.vectors["clip_l"].grad is None  # exactly: it cancels, so it is not computed


def test_the_guided_output_is_guidance_of_the_two_passes(tiny_model) -> None:
    model = tiny_model("tiny-sd2")  # v-prediction: guidance is applied to the v outputs
    method = _method(model, cfg_scale="2-4")
    batch = _batch(model)
    with torch.no_grad():
        guided = method.guided_output(model, batch)
        pos = model.predict(batch.noisy_latents, batch.timesteps,
                            model.encode_prompts(batch.prompts, method.embeddings))
        neg = model.predict(batch.noisy_latents, batch.timesteps,
                            model.encode_prompts([negative_prompt(p, "ballart") for p in batch.prompts],
                                                 method.embeddings))
    scale = torch.tensor([2 + 2 * 200 / 999, 2 + 2 * 700 / 999]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(guided, neg + scale * (pos - neg), rtol=1e-4, atol=1e-5)


def test_reconstruction_term_is_the_pixel_l1_of_the_decoded_prediction(tiny_model) -> None:
    model = tiny_model("tiny-sd1")
    plain, rec = _method(model), _method(model, reconstruction=True, reconstruction_weight=0.5)
    batch = _batch(model)
    with torch.no_grad():
        base = float(plain.loss(model, batch))
        total = float(rec.loss(model, batch))
        guided = rec.guided_output(model, batch)
        x0 = (batch.noisy_latents - (1 - batch.alphas_cumprod[batch.timesteps]).sqrt().reshape(-1, 1, 1, 1) * guided) \
            / batch.alphas_cumprod[batch.timesteps].sqrt().reshape(-1, 1, 1, 1)
        l1 = float((model.decode_latents(x0) - batch.data.pixels).abs().mean())
    assert total == pytest.approx(base + 0.5 * l1, rel=1e-4)
    assert rec.decodes_latents and not plain.decodes_latents


# --- training end to end ------------------------------------------------------------------------------------------

def _trained(model, start: DreamArtist, artifacts: list[Path]) -> DreamArtist:
    positive, negative = (read_embedding(p) for p in artifacts)
    return DreamArtist(start.config, positive, negative)


@pytest.mark.parametrize(("name", "reconstruction", "steps"), [("tiny-sd1", False, 12), ("tiny-sd1", True, 12),
                                                               ("tiny-sd2", True, 12), ("tiny-sdxl", False, 30)])
def test_overfits_one_image_and_changes_nothing_else(name, reconstruction, steps, tiny_model, one_image_dataset,
                                                     tmp_path) -> None:
    model = tiny_model(name)
    before = weights_checksum(model)
    template = tmp_path / "name_only.txt"
    from finetune_core.data.dataset import ImageDataset
    from finetune_core.data.dataset_config import DatasetConfig
    data = ImageDataset(DatasetConfig(data_dir=str(one_image_dataset), width=64, height=64, keep_pixels=True,
                                      latent_sampling="deterministic", template=str(template)), placeholder="ballart")
    data.prepare(model)
    latents, pixels = data.get_batch(0, 0).latents, data.get_batch(0, 0).pixels
    config = DreamArtistConfig(num_vectors=2, neg_num_vectors=3, init_text="thing", reconstruction=reconstruction)
    start = DreamArtist(config, *create_pair(model, "ballart", config, seed=7))
    pixels = pixels.expand(2, -1, -1, -1)
    start_loss = _eval_loss(model, start, latents, pixels)
    result = service.train(_request(one_image_dataset, template, steps, reconstruction=reconstruction), model,
                           service.OutputFolders.standalone(tmp_path / "out"))
    suffix = ".safetensors" if name == "tiny-sdxl" else ".pt"
    assert [p.name for p in result.artifacts] == [f"ballart{suffix}", f"ballart-neg{suffix}"]
    trained = _trained(model, start, result.artifacts)
    for half in (trained.positive, trained.negative):
        assert {k: v.shape[-1] for k, v in half.file.vectors.items()} == WIDTHS[name] and half.file.step == steps
    end_loss = _eval_loss(model, trained, latents, pixels)
    # The evaluation draws are fixed, so the drop is the embeddings' doing: 12 steps at lr 0.05 on one image lowered
    # this loss by 14-19% on SD1/SD2 (with reconstruction too); SDXL's tiny model needs more steps to move it.
    # 3% is far above float noise and well below those drops.
    assert end_loss < start_loss * 0.97, (start_loss, end_loss)
    assert weights_checksum(model) == before
    assert not any(p.requires_grad for m in model.trainable_modules().values() for p in m.parameters())


def _eval_loss(model, method: DreamArtist, latents: torch.Tensor, pixels: torch.Tensor) -> float:
    """The method's own loss (guidance and, when on, reconstruction to the training image) over 8 fixed draws."""
    losses = []
    for seed in range(4):
        batch = _batch(model, "a picture of ballart", seed=seed)
        x0 = latents.expand(2, -1, -1, -1)
        noisy = objective.add_noise(x0, batch.noise, batch.timesteps, batch.alphas_cumprod)
        target = objective.training_target(model.prediction_type, x0, batch.noise, batch.timesteps,
                                           batch.alphas_cumprod)
        data = dataclasses.replace(batch.data, latents=x0, pixels=pixels)
        batch = dataclasses.replace(batch, data=data, latents=x0, noisy_latents=noisy, target=target)
        with torch.no_grad():
            losses.append(float(method.loss(model, batch)))
    return sum(losses) / len(losses)


def test_both_files_load_weights_only_and_pass_the_webui_gate(tiny_model, one_image_dataset, tmp_path) -> None:
    model = tiny_model("tiny-sd1")
    folders = service.OutputFolders.standalone(tmp_path / "out")
    request = _request(one_image_dataset, tmp_path / "name_only.txt", 4)
    request.train_settings["save_every"] = 2
    result = service.train(request, model, folders)
    assert result.artifacts == [folders.embeddings / "ballart.pt", folders.embeddings / "ballart-neg.pt"]
    copies = sorted(p.name for p in (result.run_dir / "artifacts").iterdir())
    assert copies == ["ballart-2-neg.pt", "ballart-2.pt", "ballart-4-neg.pt", "ballart-4.pt"]
    for path, name, rows in zip(result.artifacts, ("ballart", "ballart-neg"), (2, 3)):
        webui_gate(path)  # the stock WebUI's restricted unpickler and zip-entry check
        raw = torch.load(path, weights_only=True)
        assert raw["name"] == name and raw["step"] == 4 and raw["sd_checkpoint"] == model.identity.shorthash
        (vectors,) = raw["string_to_param"].values()  # the WebUI's rule: exactly one entry
        assert vectors.shape == (rows, 768) and vectors.dtype == torch.float32
        assert torch.equal(read_embedding(path).vectors["clip_l"], vectors)
    state = torch.load(result.run_dir / "state" / "checkpoint.pt", weights_only=True)
    assert torch.equal(state["method"]["negative.clip_l"], read_embedding(result.artifacts[1]).vectors["clip_l"])


def test_interrupt_then_resume_equals_uninterrupted_with_ema(tiny_model, one_image_dataset, tmp_path) -> None:
    model = tiny_model("tiny-sd1")
    template = tmp_path / "name_only.txt"
    settings = {"ema_decay": 0.8, "ema_every": 2, "neg_ema_decay": 0.7, "neg_ema_every": 3, "neg_lr_weight": 0.5,
                "cfg_scale": "2-4:cos2"}
    straight = service.train(_request(one_image_dataset, template, 8, **settings), model,
                             service.OutputFolders.standalone(tmp_path / "a"))
    control = Control()

    def stop_at_3(event):
        if isinstance(event, StepEvent) and event.step == 3:
            control.interrupt()
    folders = service.OutputFolders.standalone(tmp_path / "b")
    first = service.train(_request(one_image_dataset, template, 8, **settings), model, folders, on_event=stop_at_3,
                          control=control)
    assert first.interrupted and first.step == 3
    state = torch.load(first.run_dir / "state" / "checkpoint.pt", weights_only=True)
    assert len(state["averages"]) == 2  # the EMA of each embedding is part of the resume state
    resumed = service.train(service.TrainRequest("dreamartist", "ballart", resume_run=str(first.run_dir)), model,
                            folders)
    assert resumed.step == 8
    for a, b in zip(straight.artifacts, resumed.artifacts):
        assert torch.equal(read_embedding(a).vectors["clip_l"], read_embedding(b).vectors["clip_l"])


def test_continue_from_an_existing_pair_keeps_its_step(tiny_model, one_image_dataset, tmp_path) -> None:
    model = tiny_model("tiny-sd1")
    folders = service.OutputFolders.standalone(tmp_path / "out")
    created = service.create("dreamartist", "ballart", {"num_vectors": 2, "neg_num_vectors": 4}, model, folders)
    assert [p.name for p in created] == ["ballart.pt", "ballart-neg.pt"]
    start = [read_embedding(p) for p in created]
    assert [e.step for e in start] == [0, 0] and [e.num_vectors for e in start] == [2, 4]
    assert not torch.equal(start[0].vectors["clip_l"][:2], start[1].vectors["clip_l"][:2])  # the negative's noise
    request = _request(one_image_dataset, tmp_path / "name_only.txt", 3, continue_from="ballart")
    first = service.train(request, model, folders)
    assert first.artifacts == created and [read_embedding(p).step for p in created] == [3, 3]
    request.train_settings["steps"] = 5
    second = service.train(request, model, folders)
    halves = [read_embedding(p) for p in second.artifacts]
    assert [h.step for h in halves] == [5, 5] and [h.num_vectors for h in halves] == [2, 4]
    assert [h.name for h in halves] == ["ballart", "ballart-neg"]


def test_previews_put_name_in_the_prompt_and_name_neg_in_the_negative(tiny_model, one_image_dataset, tmp_path,
                                                                       monkeypatch) -> None:
    model = tiny_model("tiny-sd1")
    seen = []
    original = type(model).sample

    def spy(self, request, embeddings=None, context_transform=None, adapters=None):
        seen.append((request, sorted(embeddings or {})))
        return original(self, request, embeddings, context_transform, adapters)
    monkeypatch.setattr(type(model), "sample", spy)
    request = _request(one_image_dataset, tmp_path / "name_only.txt", 2)
    request.train_settings.update(preview_every=2, preview_steps=2)
    service.train(request, model, service.OutputFolders.standalone(tmp_path / "out"))
    (sample, names), = seen
    assert "ballart" in sample.prompts[0] and "ballart-neg" not in sample.prompts[0]
    assert sample.negative_prompts == ("ballart-neg",) and names == ["ballart", "ballart-neg"]


# --- the discriminator --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def discriminator_file(tmp_path_factory) -> Path:
    """A random 3-class ConvNeXt-Tiny from timm, saved as a plain state dict (no weights ship anywhere)."""
    import timm

    torch.manual_seed(0)
    network = timm.create_model("convnext_tiny", pretrained=False, num_classes=3)
    path = tmp_path_factory.mktemp("disc") / "convnext_tiny_3.pth"
    torch.save(network.state_dict(), path)
    return path


def test_discriminator_term_adds_to_the_loss_and_reaches_both_embeddings(tiny_model, discriminator_file) -> None:
    from finetune_core.methods.discriminator import load_discriminator

    model = tiny_model("tiny-sd1")
    disc = load_discriminator(discriminator_file, model.device)
    config = DreamArtistConfig(num_vectors=2, neg_num_vectors=3, discriminator_path=str(discriminator_file),
                               discriminator_weight=2.0)
    pair = create_pair(model, "ballart", config, seed=1)
    with_disc, without = DreamArtist(config, *pair, disc), DreamArtist(config, *pair)
    batch = _batch(model, n=1)
    total = with_disc.loss(model, batch)
    with torch.no_grad():
        guided = without.guided_output(model, batch)
        a = batch.alphas_cumprod[batch.timesteps].reshape(-1, 1, 1, 1)
        pixels = model.decode_latents((batch.noisy_latents - (1 - a).sqrt() * guided) / a.sqrt())
        expected = float(without.loss(model, batch)) + 2.0 * float((1 - disc.score(pixels)).mean())
    assert float(total.detach()) == pytest.approx(expected, rel=1e-4)
    assert 0 < float((1 - disc.score(pixels)).mean()) < 1  # a real probability from the network
    total.backward()
    for half in (with_disc.positive, with_disc.negative):
        assert float(half.embedding.vectors["clip_l"].grad.abs().sum()) > 0


def test_training_with_the_discriminator_runs_and_changes_nothing_else(tiny_model, one_image_dataset, tmp_path,
                                                                        discriminator_file) -> None:
    model = tiny_model("tiny-sd1")
    before = weights_checksum(model)
    events = []
    result = service.train(_request(one_image_dataset, tmp_path / "name_only.txt", 2,
                                    discriminator_path=str(discriminator_file)), model,
                           service.OutputFolders.standalone(tmp_path / "out"), on_event=events.append)
    assert result.step == 2 and not [e for e in events if isinstance(e, Warning_)]
    assert weights_checksum(model) == before
    assert all(math.isfinite(float(read_embedding(p).vectors["clip_l"].abs().sum())) for p in result.artifacts)


def test_original_convnext_release_keys_are_converted(discriminator_file, tmp_path) -> None:
    """The original extension loads the ConvNeXt repository's layout; timm's converter maps it to timm's."""
    from finetune_core.methods.discriminator import check_discriminator_file, load_discriminator

    state = torch.load(discriminator_file, weights_only=True)
    original = {}
    for key, value in state.items():
        key = key.replace("stem.", "downsample_layers.0.").replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        key = key.replace("head.fc.", "head.").replace("head.norm.", "norm.")
        for stage in range(4):
            key = key.replace(f"stages.{stage}.downsample.", f"downsample_layers.{stage}.")
            key = key.replace(f"stages.{stage}.blocks.", f"stages.{stage}.")
        original[key] = value
    path = tmp_path / "original.pth"
    torch.save(original, path)
    check_discriminator_file(path)
    loaded = load_discriminator(path, torch.device("cpu"))
    reference = load_discriminator(discriminator_file, torch.device("cpu"))
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(pixels), reference.score(pixels))


def _pair_steps(folder: Path, name: str) -> tuple[int, int]:
    return read_embedding(folder / f"{name}.pt").step, read_embedding(folder / f"{name}-neg.pt").step


def test_a_pair_lands_together_or_not_at_all(tiny_model, tmp_path, monkeypatch) -> None:
    """Issue 25.7: a failure while the second file is written leaves the previous pair intact; a kill among the
    renames is finished by the next run's cleanup, so NAME.pt never sits beside another run's NAME-neg.pt."""
    from finetune_core.formats import atomic, embedding
    from finetune_core.jobs.preflight import remove_stale_temporaries
    from finetune_core.methods.dreamartist import DreamArtistCreate, create_file

    model = tiny_model("tiny-sd1")
    create_file(model, "pair", DreamArtistCreate(), tmp_path, False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # Both halves of the new pair differ from the old in their numbers (an identical half could even come out
    # byte-identical: the legacy .pt format keys storages by address, which the allocator may reuse).
    changed = DreamArtistCreate(init_text="a dog", neg_init_text="a cat")
    real_write = embedding.save_pt

    def fail_on_negative(obj, path, overwrite=False, needed_bytes=0):
        if Path(path).name == "pair-neg.pt":
            raise OSError(28, "No space left on device", str(path))
        return real_write(obj, path, overwrite, needed_bytes)

    monkeypatch.setattr(embedding, "save_pt", fail_on_negative)
    with pytest.raises(OSError):
        create_file(model, "pair", changed, tmp_path, True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old pair intact, no temporaries
    monkeypatch.setattr(embedding, "save_pt", real_write)

    real_replace = atomic.os.replace
    renamed: list[str] = []

    def killed_after_first_rename(src, dst):
        if Path(dst).name.startswith("pair") and renamed:
            raise KeyboardInterrupt  # the process dies between the two renames
        real_replace(src, dst)
        if Path(dst).name.startswith("pair"):
            renamed.append(Path(dst).name)

    monkeypatch.setattr(atomic.os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        create_file(model, "pair", changed, tmp_path, True)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    remove_stale_temporaries(tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(after) == ["pair-neg.pt", "pair.pt"]
    assert after["pair.pt"] != before["pair.pt"] and after["pair-neg.pt"] != before["pair-neg.pt"]
