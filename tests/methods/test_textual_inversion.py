"""Textual Inversion end to end on the tiny models: it learns, touches nothing else, writes every WebUI form,
reads them back, and resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune_core.errors import ArtifactError, ConfigError, DatasetError, FinetuneError, ModelMismatchError
from finetune_core.formats.embedding import read_embedding
from finetune_core.jobs import service
from finetune_core.methods.textual_inversion import TextualInversionConfig, create_embedding, initial_vectors
from finetune_core.model.interface import TrainableEmbedding
from finetune_core.train import objective
from finetune_core.train.control import Control
from finetune_core.train.events import StepEvent
from tests.conftest import EXAMPLES, weights_checksum

WIDTHS = {"tiny-sd1": {"clip_l": 768}, "tiny-sd2": {"clip_l": 1024}, "tiny-sdxl": {"clip_l": 768, "clip_g": 1280}}


def _request(data: Path, template: Path, steps: int, **method: object) -> service.TrainRequest:
    return service.TrainRequest(
        "textual-inversion", "ballword", {"init_text": "thing", "num_vectors": 2, **method},
        {"data_dir": str(data), "width": 64, "height": 64, "template": str(template),
         "latent_sampling": "deterministic"},
        {"steps": steps, "learning_rate": "0.05", "preview_every": 0, "save_every": 0, "seed": 7})


def _eval_loss(model, embedding: TrainableEmbedding, latents: torch.Tensor, prompt: str) -> float:
    """Mean loss over 16 fixed (timestep, noise) draws: deterministic, so any change is the embedding's doing."""
    gen = torch.Generator().manual_seed(1234)
    timesteps = torch.linspace(50, 950, 16).long()
    noise = torch.randn((16, *latents.shape[1:]), generator=gen)
    x0 = latents.expand(16, -1, -1, -1)
    alphas = model.alphas_cumprod()
    noisy = objective.add_noise(x0, noise, timesteps, alphas)
    target = objective.training_target(model.prediction_type, x0, noise, timesteps, alphas)
    with torch.no_grad():
        cond = model.encode_prompts([prompt] * 16, {embedding.name: embedding})
        pred = model.predict(noisy, timesteps, cond)
    return float(objective.weighted_mse(pred, target))


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def test_overfits_one_image_and_changes_nothing_else(name, tiny_model, one_image_dataset, tmp_path):
    model = tiny_model(name)
    before_weights = weights_checksum(model)
    template = tmp_path / "name_only.txt"
    folders = service.OutputFolders.standalone(tmp_path / "out")
    from finetune_core.data.dataset import ImageDataset
    from finetune_core.data.dataset_config import DatasetConfig
    data = ImageDataset(DatasetConfig(data_dir=str(one_image_dataset), width=64, height=64,
                                      latent_sampling="deterministic", template=str(template)), placeholder="ballword")
    data.prepare(model)
    latents = data.get_batch(0, 0).latents
    start = create_embedding(model, "ballword", TextualInversionConfig(init_text="thing", num_vectors=2))
    start_emb = TrainableEmbedding("ballword", start.vectors)
    loss_before = _eval_loss(model, start_emb, latents, "a picture of ballword")

    result = service.train(_request(one_image_dataset, template, 40), model, folders)

    trained = read_embedding(result.artifacts[0])
    assert {k: v.shape[-1] for k, v in trained.vectors.items()} == WIDTHS[name]
    assert trained.step == 40
    loss_after = _eval_loss(model, TrainableEmbedding("ballword", trained.vectors), latents, "a picture of ballword")
    # The evaluation draws are fixed, so the drop is the embedding's doing, not noise. 40 steps at lr 0.05 on one
    # image lower this loss by 10-40% on the tiny models; 3% is far above float noise (1e-6) and well below that.
    assert loss_after < loss_before * 0.97, (loss_before, loss_after)
    assert weights_checksum(model) == before_weights
    assert not any(p.requires_grad for m in model.trainable_modules().values() for p in m.parameters())


def test_init_text_spreads_tokens_and_empty_gives_zeros(tiny_model):
    model = tiny_model("tiny-sd1")
    tokens = model.token_vectors("red blue green")["clip_l"]
    assert tokens.shape[0] == 3
    vectors = initial_vectors(model, "red blue green", 5)["clip_l"]
    # row i = token[i * 3 // 5] -> tokens 0, 0, 1, 1, 2 (the WebUI's spreading rule)
    for row, token in enumerate([0, 0, 1, 1, 2]):
        assert torch.equal(vectors[row], tokens[token])
    assert torch.count_nonzero(initial_vectors(model, "", 3)["clip_l"]) == 0


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_written_forms_read_back_equal_and_pt_is_weights_only(fmt, tiny_model, one_image_dataset, tmp_path):
    model = tiny_model("tiny-sd1")
    folders = service.OutputFolders.standalone(tmp_path / "out")
    result = service.train(_request(one_image_dataset, tmp_path / "name_only.txt", 3, save_format=fmt), model, folders)
    path = result.artifacts[0]
    assert path.parent == folders.embeddings and path.suffix == f".{fmt}"
    back = read_embedding(path)
    if fmt == "pt":
        raw = torch.load(path, weights_only=True)
        assert set(raw) >= {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint",
                            "sd_checkpoint_name"}
        assert torch.equal(raw["string_to_param"]["*"], back.vectors["clip_l"])
        assert raw["sd_checkpoint"] == model.identity.shorthash and raw["step"] == 3
    state = torch.load(Path(result.run_dir) / "state" / "checkpoint.pt", weights_only=True)
    assert torch.equal(state["method"]["clip_l"], back.vectors["clip_l"])  # the resume state is the same vectors


def test_interrupt_then_resume_equals_uninterrupted(tiny_model, one_image_dataset, tmp_path):
    model = tiny_model("tiny-sd1")
    template = tmp_path / "name_only.txt"
    straight = service.train(_request(one_image_dataset, template, 8),
                             model, service.OutputFolders.standalone(tmp_path / "a"))
    control = Control()

    def stop_at_3(event):
        if isinstance(event, StepEvent) and event.step == 3:
            control.interrupt()
    folders_b = service.OutputFolders.standalone(tmp_path / "b")
    first = service.train(_request(one_image_dataset, template, 8), model, folders_b, on_event=stop_at_3,
                          control=control)
    assert first.interrupted and first.step == 3 and first.artifacts[0].exists()
    resumed = service.train(service.TrainRequest("textual-inversion", "ballword", resume_run=str(first.run_dir)),
                            model, folders_b)
    assert resumed.step == 8 and not resumed.interrupted
    a, b = read_embedding(straight.artifacts[0]), read_embedding(resumed.artifacts[0])
    assert torch.equal(a.vectors["clip_l"], b.vectors["clip_l"])


def test_continue_training_from_existing_embedding_keeps_its_step(tiny_model, one_image_dataset, tmp_path):
    model = tiny_model("tiny-sd1")
    folders = service.OutputFolders.standalone(tmp_path / "out")
    created = service.create("textual-inversion", "ballword", {"init_text": "ball", "num_vectors": 3}, model, folders)
    assert read_embedding(created[0]).step == 0
    request = _request(one_image_dataset, tmp_path / "name_only.txt", 5, continue_from="ballword")
    request.method_settings.pop("num_vectors")
    first = service.train(request, model, folders)
    assert first.artifacts[0] == created[0] and read_embedding(created[0]).step == 5
    request.train_settings["steps"] = 7
    second = service.train(request, model, folders)
    assert read_embedding(second.artifacts[0]).step == 7 and read_embedding(second.artifacts[0]).num_vectors == 3


def test_continuing_a_file_already_at_max_steps_says_so(tiny_model, one_image_dataset, tmp_path):
    model = tiny_model("tiny-sd1")
    folders = service.OutputFolders.standalone(tmp_path / "out")
    request = _request(one_image_dataset, tmp_path / "name_only.txt", 3)
    service.train(request, model, folders)
    before = (folders.embeddings / "ballword.pt").read_bytes()
    again = _request(one_image_dataset, tmp_path / "name_only.txt", 3, continue_from="ballword")
    with pytest.raises(ConfigError, match="already at step 3.*raise max steps above 3"):
        service.train(again, model, folders)
    assert (folders.embeddings / "ballword.pt").read_bytes() == before


def test_optimizer_state_files_only_for_optimizers_the_webui_loads(tiny_model, tmp_path):
    from finetune_core.methods.textual_inversion import TextualInversion

    file = create_embedding(tiny_model("tiny-sd1"), "word", TextualInversionConfig())
    method = TextualInversion(TextualInversionConfig(), file)
    optimizer = torch.optim.SGD(method.trainable_parameters(tiny_model("tiny-sd1"))[0].params, lr=0.1)
    # The WebUI loads an embedding's .optim into AdamW: SGD's state would break its next step.
    assert method.optimizer_sidecar(tmp_path / "word.pt", optimizer, "sgd") is None
    assert not (tmp_path / "word.pt.optim").exists()


def test_embedding_for_another_family_is_refused(tiny_model, one_image_dataset, tmp_path):
    folders = service.OutputFolders.standalone(tmp_path / "out")
    service.create("textual-inversion", "sd2word", {}, tiny_model("tiny-sd2"), folders)
    request = _request(one_image_dataset, tmp_path / "name_only.txt", 2, continue_from="sd2word")
    with pytest.raises(ModelMismatchError, match="made for SD2 models and the model to train on is SD1"):
        service.plan(request, folders, family="sd1")  # with the request, before a model loads
    with pytest.raises(ModelMismatchError, match="1024"):  # a host that cannot tell: the model's own check
        service.train_plan(service.plan(request, folders), tiny_model("tiny-sd1"))


def _bad(tmp_path: Path, model, data=None, name="ballword", method=None, train=None, overwrite=False,
         **data_settings) -> None:
    request = service.TrainRequest("textual-inversion", name, method or {},
                                   {"data_dir": str(data), "width": 64, "height": 64, **data_settings},
                                   {"steps": 2, "preview_every": 0, "save_every": 0, **(train or {})},
                                   overwrite=overwrite)
    service.train(request, model, service.OutputFolders.standalone(tmp_path / "out"))


def test_bad_inputs_each_give_one_clear_sentence(tiny_model, one_image_dataset, tmp_path):
    model = tiny_model("tiny-sd1")
    empty = tmp_path / "empty"
    empty.mkdir()
    only_txt = tmp_path / "only_txt"
    only_txt.mkdir()
    for i in range(3):
        (only_txt / f"{i}.txt").write_text("x")
    with pytest.raises(DatasetError, match="does not exist|not found|missing"):
        _bad(tmp_path, model, tmp_path / "nope")
    with pytest.raises(DatasetError, match="empty|no images"):
        _bad(tmp_path, model, empty)
    with pytest.raises(DatasetError, match="3 .txt"):
        _bad(tmp_path, model, only_txt)
    with pytest.raises(ConfigError, match="[Ii]nvalid learning rate schedule"):
        _bad(tmp_path, model, one_image_dataset, train={"learning_rate": "0.005:abc"})
    with pytest.raises(ConfigError, match="steps"):
        _bad(tmp_path, model, one_image_dataset, train={"steps": 0})
    with pytest.raises(ConfigError, match="steps"):
        _bad(tmp_path, model, one_image_dataset, train={"steps": -5})
    with pytest.raises(DatasetError, match="batch size 4.*1|1.*batch size 4"):
        _bad(tmp_path, model, one_image_dataset, batch_size=4)
    with pytest.raises(ConfigError, match=r"never uses \[name\]"):
        _bad(tmp_path, model, one_image_dataset, template="none.txt")
    for name in ("../evil", "a/b", "  "):
        with pytest.raises(ConfigError, match="name"):
            _bad(tmp_path, model, one_image_dataset, name=name)


def test_existing_output_is_refused_unless_overwrite_and_kept_intact(tiny_model, one_image_dataset, tmp_path):
    model = tiny_model("tiny-sd1")
    target = tmp_path / "out" / "embeddings" / "ballword.pt"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"precious")
    with pytest.raises(ArtifactError, match="already exists"):
        _bad(tmp_path, model, one_image_dataset)
    assert target.read_bytes() == b"precious"
    _bad(tmp_path, model, one_image_dataset, overwrite=True)
    assert read_embedding(target).step == 2


def test_every_image_mode_and_a_corrupt_file_train(tiny_model, tmp_path):
    from PIL import Image
    folder = tmp_path / "modes"
    folder.mkdir()
    base = Image.open(EXAMPLES / "ball-01.png").convert("RGBA").resize((48, 48))
    for mode in ("L", "LA", "RGBA", "P", "CMYK"):
        base.convert(mode).save(folder / f"img-{mode}.{'jpg' if mode == 'CMYK' else 'png'}")
    base.convert("I;16").save(folder / "img-I16.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "tiny.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    result = service.train(service.TrainRequest(
        "textual-inversion", "modes", {}, {"data_dir": str(folder), "width": 64, "height": 64, "batch_size": 2},
        {"steps": 2, "preview_every": 0, "save_every": 0}), tiny_model("tiny-sd1"),
        service.OutputFolders.standalone(tmp_path / "out"))
    assert result.step == 2
    report = service.lint({"data_dir": str(folder), "width": 64, "height": 64})
    text = report.format()
    assert "broken.png" in text and "tiny.png" in text


def test_bad_checkpoints_are_refused(tmp_path):
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    text = tmp_path / "notes.ckpt"
    text.write_text("hello, I am not a checkpoint")
    for path in (truncated, text):
        with pytest.raises(FinetuneError):
            service.load(str(path))


def test_optimizer_sidecar_pairs_with_the_webui_checksum(tiny_model, one_image_dataset, tmp_path):
    request = _request(one_image_dataset, tmp_path / "name_only.txt", 2)
    request.train_settings["save_optimizer_state"] = True
    result = service.train(request, tiny_model("tiny-sd1"), service.OutputFolders.standalone(tmp_path / "out"))
    pt = result.artifacts[0]
    sidecar = torch.load(pt.with_name(pt.name + ".optim"), weights_only=True)
    assert set(sidecar) == {"hash", "optimizer_state_dict"}
    vec = torch.load(pt, weights_only=True)["string_to_param"]["*"]
    webui_hash = 0  # the WebUI's loop, element by element as 0-d tensors
    for v in vec.reshape(-1) * 100:
        webui_hash = (webui_hash * 281 ^ int(v) * 997) & 0xFFFFFFFF
    assert sidecar["hash"] == f"{webui_hash & 0xffff:04x}"
    fresh = torch.optim.AdamW([vec.clone().requires_grad_(True)], lr=0.005, weight_decay=0.0)
    fresh.load_state_dict(sidecar["optimizer_state_dict"])  # what the WebUI does when the hash matches
    assert fresh.state_dict()["state"][0]["exp_avg"].shape == vec.shape
