"""Hypernetworks: the WebUI's module architecture bit for bit, applying them, training, files and bad input."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from finetune_core.errors import ArtifactError, ConfigError, ModelMismatchError
from finetune_core.formats.embedding import EmbeddingFile, write_embedding
from finetune_core.formats.hypernetwork_file import HypernetworkFile, read_hypernetwork, write_hypernetwork
from finetune_core.jobs import service
from finetune_core.methods.hypernetwork import Hypernetwork, HypernetworkConfig, HypernetworkCreate, create_hypernetwork
from finetune_core.methods.hypernetwork_net import HypernetworkModule, activation_classes
from finetune_core.train.control import Control
from finetune_core.train.events import StepEvent, Warning_
from tests.conftest import weights_checksum


def test_sequential_numbering_matches_the_webui():
    # relu, no LayerNorm: Linear(0) ReLU(1) Linear(2)
    plain = HypernetworkModule(8, [1, 2, 1], "relu")
    assert list(plain.state_dict()) == ["linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias"]
    # with LayerNorm: Linear(0) ReLU(1) LN(2) Linear(3) LN(4)
    normed = HypernetworkModule(8, [1, 2, 1], "relu", add_layer_norm=True)
    assert [k for k in normed.state_dict() if k.endswith("weight")] == [
        "linear.0.weight", "linear.2.weight", "linear.3.weight", "linear.4.weight"]
    # linear activation adds nothing; activate_output adds one after the last Linear; dropout adds Dropout entries
    assert list(HypernetworkModule(8, [1, 2, 1], "linear").state_dict())[2] == "linear.1.weight"
    dropped = HypernetworkModule(8, [1, 2, 2, 1], "relu", activate_output=True, dropout_structure=[0, 0.1, 0.2, 0])
    kinds = [type(m).__name__ for m in dropped.linear]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU"]
    assert activation_classes()["swish"] is torch.nn.Hardswish


def test_hand_built_webui_state_dict_gives_the_same_outputs():
    dim = 6
    gen = torch.Generator().manual_seed(3)
    w1, b1 = torch.randn(12, dim, generator=gen), torch.randn(12, generator=gen)
    w2, b2 = torch.randn(dim, 12, generator=gen), torch.randn(dim, generator=gen)
    webui = OrderedDict([("linear.0.weight", w1), ("linear.0.bias", b1), ("linear.2.weight", w2),
                         ("linear.2.bias", b2)])
    module = HypernetworkModule(dim, [1, 2, 1], "relu")
    module.load_state_dict(webui, strict=True)
    x = torch.randn(2, 5, dim, generator=gen)
    expected = x + (torch.relu(x @ w1.T + b1) @ w2.T + b2)
    assert torch.allclose(module.train()(x), expected, atol=1e-6)
    module.eval().multiplier = 0.5
    assert torch.allclose(module(x), x + 0.5 * (torch.relu(x @ w1.T + b1) @ w2.T + b2), atol=1e-6)


def test_new_module_inits_follow_the_webui():
    module = HypernetworkModule(64, [1, 2, 1], "relu", "Normal", add_layer_norm=True)
    linears = [m for m in module.linear if isinstance(m, torch.nn.Linear)]
    norms = [m for m in module.linear if isinstance(m, torch.nn.LayerNorm)]
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears + norms)
    assert all(abs(float(m.weight.detach().std()) - 0.01) < 0.003 for m in linears + norms)  # LayerNorm also N(0, 0.01)
    kaiming = HypernetworkModule(64, [1, 2, 1], "relu", "KaimingNormal")
    assert float(kaiming.linear[0].weight.detach().std()) > 0.1


def test_file_reloads_tensor_equal_with_the_webui_layout(tmp_path):
    file = create_hypernetwork("hn", HypernetworkCreate(sizes="768, 320", activation_func="relu"), seed=1)
    path = write_hypernetwork(file, tmp_path / "hn.pt")
    raw = torch.load(path, weights_only=True)
    assert {k for k in raw if isinstance(k, int)} == {768, 320}
    assert isinstance(raw[768], tuple) and len(raw[768]) == 2
    assert list(raw[768][0]) == ["linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias"]
    assert raw[768][0]["linear.0.weight"].shape == (1536, 768) and raw[768][0]["linear.0.weight"].dtype == torch.float32
    for key in ("step", "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
                "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure",
                "last_layer_dropout", "optional_info"):
        assert key in raw
    back = read_hypernetwork(path)
    for size in (768, 320):
        for ours, theirs in zip(file.layers[size], back.layers[size]):
            assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_multiplier_zero_is_exactly_the_base_model_and_a_trained_one_changes_it(tiny_model):
    model = tiny_model("tiny-sd1")
    file = create_hypernetwork("hn", HypernetworkCreate(sizes="768, 32, 64", weight_init="XavierNormal"), seed=2)
    method = Hypernetwork(HypernetworkConfig(preview_multiplier=0.0), file)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    t = torch.tensor([500])
    with torch.no_grad():
        cond = model.encode_prompts(["a ball"])
        base = model.predict(x, t, cond)
        with model.context_transform(method.inference_extras().context_transform):
            zero = model.predict(x, t, cond)
        method.config = HypernetworkConfig(preview_multiplier=1.0)
        with model.context_transform(method.inference_extras().context_transform):
            full = model.predict(x, t, cond)
    assert torch.equal(base, zero)
    assert not torch.allclose(base, full, atol=1e-5)
    assert method.pairs.training  # previews leave the modules in training mode


def _request(data: Path, steps: int, **method: object) -> service.TrainRequest:
    return service.TrainRequest(
        "hypernetwork", "hn", {"sizes": "768, 32, 64", "weight_init": "XavierNormal", "layer_structure": "1, 0.25, 1",
                               **method},
        {"data_dir": str(data), "width": 64, "height": 64, "template": str(data.parent / "name_only.txt"),
         "latent_sampling": "deterministic"},
        {"steps": steps, "learning_rate": "0.001", "preview_every": 0, "save_every": 0, "seed": 3})


def _eval_loss(model, file: HypernetworkFile, data_dir: Path) -> float:
    """Mean loss over 16 fixed (timestep, noise) draws on the image: deterministic, so a drop is the network's."""
    from finetune_core.data.dataset import ImageDataset
    from finetune_core.data.dataset_config import DatasetConfig
    from finetune_core.train import objective
    data = ImageDataset(DatasetConfig(data_dir=str(data_dir), width=64, height=64, latent_sampling="deterministic"))
    data.prepare(model)
    x0 = data.get_batch(0, 0).latents.expand(16, -1, -1, -1)
    gen = torch.Generator().manual_seed(99)
    t = torch.linspace(50, 950, 16).long()
    noise = torch.randn(x0.shape, generator=gen)
    alphas = model.alphas_cumprod()
    method = Hypernetwork(HypernetworkConfig(), file)
    with torch.no_grad(), model.context_transform(method.inference_extras().context_transform):
        cond = model.encode_prompts(["a picture of hn"] * 16)
        pred = model.predict(objective.add_noise(x0, noise, t, alphas), t, cond)
    return float(objective.weighted_mse(pred, objective.training_target(model.prediction_type, x0, noise, t, alphas)))


def test_trains_lowers_loss_keeps_model_weights_and_resumes_exactly(tiny_model, one_image_dataset, tmp_path):
    model = tiny_model("tiny-sd1")
    before = weights_checksum(model)
    start = create_hypernetwork("hn", HypernetworkCreate(sizes="768, 32, 64", weight_init="XavierNormal",
                                                                   layer_structure="1, 0.25, 1"), seed=3)
    straight = service.train(_request(one_image_dataset, 30), model, service.OutputFolders.standalone(tmp_path / "a"))
    assert weights_checksum(model) == before
    trained = read_hypernetwork(straight.artifacts[0])
    assert trained.step == 30
    # Fixed evaluation draws, so the drop is the training's doing. 30 steps at lr 1e-3 on one image lower this loss
    # by about 40% on tiny-sd1 (a narrow 1, 0.25, 1 network keeps the test quick); 5% is far above float noise.
    loss_before, loss_after = _eval_loss(model, start, one_image_dataset), _eval_loss(model, trained, one_image_dataset)
    assert loss_after < 0.95 * loss_before, (loss_before, loss_after)

    control = Control()
    folders = service.OutputFolders.standalone(tmp_path / "b")
    first = service.train(_request(one_image_dataset, 12), model, folders, control=control,
                          on_event=lambda e: control.interrupt() if isinstance(e, StepEvent) and e.step == 5 else None)
    assert first.interrupted and first.step == 5
    resumed = service.train(service.TrainRequest("hypernetwork", "hn", resume_run=str(first.run_dir)), model, folders)
    reference = service.train(_request(one_image_dataset, 12), model, service.OutputFolders.standalone(tmp_path / "c"))
    a, b = read_hypernetwork(reference.artifacts[0]), read_hypernetwork(resumed.artifacts[0])
    assert resumed.step == 12
    for size in a.layers:
        for sa, sb in zip(a.layers[size], b.layers[size]):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name,text_width", [("tiny-sd2", 1024), ("tiny-sdxl", 2048)])
def test_default_sizes_follow_the_model_family(name, text_width, tiny_model, one_image_dataset, tmp_path):
    warnings: list[str] = []
    result = service.train(service.TrainRequest(
        "hypernetwork", "hn", {}, {"data_dir": str(one_image_dataset), "width": 64, "height": 64},
        {"steps": 1, "preview_every": 0, "save_every": 0}), tiny_model(name),
        service.OutputFolders.standalone(tmp_path), on_event=lambda e: warnings.append(e.message)
        if isinstance(e, Warning_) else None)
    assert text_width in read_hypernetwork(result.artifacts[0]).layers
    assert any("320" in w and "never apply" in w for w in warnings)


def test_bad_settings_and_files_each_give_a_sentence(tiny_model, one_image_dataset, tmp_path):
    model = tiny_model("tiny-sd1")
    folders = service.OutputFolders.standalone(tmp_path / "out")
    cases = [({"layer_structure": "2, 1"}, "start and end with 1"),
             ({"layer_structure": "1, x, 1"}, "numbers"),
             ({"use_dropout": True, "dropout_structure": "0, 1.5, 0"}, r"\[0, 1\)"),
             ({"use_dropout": True, "dropout_structure": "0.2, 0.1, 0"}, "start and end with 0"),
             ({"activation_func": "nope"}, "unknown activation"),
             ({"weight_init": "Zeros"}, "unknown weight initialization")]
    for settings, message in cases:
        with pytest.raises(ConfigError, match=message):
            service.train(_request(one_image_dataset, 1, **settings), model, folders)
    sd2_file = create_hypernetwork("sd2hn", HypernetworkCreate(sizes="1024"))
    write_hypernetwork(sd2_file, folders.hypernetworks / "sd2hn.pt")
    with pytest.raises(ModelMismatchError, match="SD2"):
        service.train(_request(one_image_dataset, 1, continue_from="sd2hn"), model, folders)
    write_embedding(EmbeddingFile("emb", {"clip_l": torch.zeros(1, 768)}, 0), folders.hypernetworks / "emb.pt")
    with pytest.raises(ArtifactError, match="embedding"):
        service.train(_request(one_image_dataset, 1, continue_from="emb"), model, folders)


def test_cached_text_conditioning_is_used(tiny_model, one_image_dataset, tmp_path, monkeypatch):
    """The text encoder is frozen, so each prompt is encoded once, without gradients, however many steps run."""
    model = tiny_model("tiny-sd1")
    calls: list[tuple[tuple[str, ...], bool]] = []
    encode = model.encode_prompts

    def counting(prompts, embeddings=None):
        calls.append((tuple(prompts), torch.is_grad_enabled()))
        return encode(prompts, embeddings)

    monkeypatch.setattr(model, "encode_prompts", counting)
    result = service.train(_request(one_image_dataset, 4), model, service.OutputFolders.standalone(tmp_path / "out"))
    assert calls == [(("a picture of hn",), False)]  # the one-line template: one prompt, encoded once
    assert result.run_dir is not None and result.run_dir.parts[-3] == "hypernetwork"  # runs/hypernetwork/<date>/


def test_optimizer_sidecar_matches_the_file_when_asked(tiny_model, one_image_dataset, tmp_path):
    from finetune_core.formats.optim_sidecar import file_shorthash, read_optimizer_sidecar
    request = _request(one_image_dataset, 2)
    request.train_settings["save_optimizer_state"] = True
    result = service.train(request, tiny_model("tiny-sd1"), service.OutputFolders.standalone(tmp_path))
    pt = next(p for p in result.artifacts if p.suffix == ".pt")
    assert pt.with_name(pt.name + ".optim") in result.artifacts
    sidecar = read_optimizer_sidecar(pt, expected_hash=file_shorthash(pt))
    assert sidecar is not None and sidecar.optimizer_name == "AdamW"
    assert len(sidecar.optimizer_state_dict["state"]) == 3 * 2 * 2 * 2  # sizes x (k, v) x linears x (weight, bias)
    raw = torch.load(pt.with_name(pt.name + ".optim"), weights_only=True)
    assert set(raw) == {"optimizer_name", "hash", "optimizer_state_dict"}


def test_no_optimizer_state_file_for_optimizers_the_webui_cannot_build(tmp_path):
    """The WebUI rebuilds a hypernetwork's optimizer from torch.optim by the name in the .optim file."""
    method = Hypernetwork(HypernetworkConfig(), create_hypernetwork("hn", HypernetworkCreate(sizes="768")))
    optimizer = torch.optim.AdamW(list(method.pairs.parameters()))
    for name in ("lion", "prodigy", "adamw8bit"):
        assert method.optimizer_sidecar(tmp_path / "hn.pt", optimizer, name) is None
    assert not (tmp_path / "hn.pt.optim").exists()
