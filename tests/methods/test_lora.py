"""LoRA: the file kohya/the WebUI/diffusers read, training (overfitting, a frozen base bit for bit, exact resume),
multiplier 0, continuing a file, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from finetune_core.errors import ArtifactError, ConfigError, ModelMismatchError
from finetune_core.formats.lora_file import read_lora
from finetune_core.jobs import service
from finetune_core.methods.lora import LoraConfig, build
from finetune_core.model.tiny import build_tiny
from finetune_core.train.control import Control
from finetune_core.train.events import StepEvent
from tests.conftest import data_section_hash
from tests.methods.lora_files import fixed_draw_loss, outputs, random_lora_file

DATA = Path(__file__).resolve().parents[2] / "examples" / "dataset"


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("tiny-sd1")


def _request(name, steps=4, method=None, train=None, **kwargs):
    return service.TrainRequest("lora", name, method_settings={"rank": 4, "alpha": 2.0, **(method or {})},
                                data_settings={"data_dir": str(DATA), "width": 64, "height": 64},
                                train_settings={"steps": steps, "save_every": 0, "preview_every": 0, "csv_every": 0,
                                                **(train or {})}, **kwargs)


def _train(model, tmp_path, name, steps=4, **kwargs):
    return service.train(_request(name, steps, **kwargs), model, service.OutputFolders.standalone(tmp_path))


def _weights(model):
    return {f"{key}.{n}": p.detach().clone() for key, m in model.trainable_modules().items()
            for n, p in m.named_parameters()}


@pytest.mark.parametrize("name,version,v2", [("tiny-sd1", "sd_v1", "False"), ("tiny-sd2", "sd_v2_v", "True"),
                                             ("tiny-sdxl", "sdxl_base_v1-0", "False")])
def test_the_file_is_kohyas_form_with_the_metadata_the_webui_reads(name, version, v2, tmp_path):
    model = build_tiny(name)
    result = _train(model, tmp_path, "style", steps=2, method={"train_text_encoder": True, "conv_rank": 2},
                    train={"save_every": 1, "preview_every": 2, "preview_steps": 1})
    path = tmp_path / "models" / "Lora" / "style.safetensors"
    assert result.artifacts[:2] == [path, path.with_name("style.preview.png")] and path.with_name(
        "style.preview.png").is_file()
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in keys}
    modules = {k.partition(".")[0] for k in keys}
    assert {k.partition(".")[2] for k in keys} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert len(keys) == 3 * len(modules) and all(tensors[f"{m}.alpha"].shape == () for m in modules)
    assert all(t.dtype == torch.float16 for t in tensors.values())  # save precision fp16, alpha included
    assert any(m.startswith("lora_te") for m in modules)
    conv = [m for m in modules if tensors[f"{m}.lora_down.weight"].dim() == 4]
    assert conv and all(tensors[f"{m}.lora_up.weight"].shape[2:] == (1, 1) for m in conv)
    assert metadata["ss_base_model_version"] == version and metadata["ss_v2"] == v2
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "4"
    assert metadata["ss_network_alpha"] == "2.0" and metadata["ss_output_name"] == "style"
    assert metadata["sshs_model_hash"] == data_section_hash(path) and metadata["ss_steps"] == "2"
    _assert_dataset_metadata(metadata)
    # intermediate saves: a file name and an ss_output_name of their own (the WebUI's alias must not collide)
    first = result.run_dir / "artifacts" / "style-1.safetensors"
    assert read_lora(first).metadata["ss_output_name"] == "style-1"


def _assert_dataset_metadata(metadata: dict[str, str]) -> None:
    """The dataset keys the WebUI's Lora card reads (it JSON-decodes values that start with "{"): the tag list from
    the caption files, the dataset size, the one resolution trained."""
    captions = [p.read_text() for p in sorted(DATA.glob("*.txt"))]
    tags: dict[str, int] = {}
    for tag in (t.strip().lower() for caption in captions for t in caption.split(",")):
        tags[tag] = tags.get(tag, 0) + 1
    assert json.loads(metadata["ss_tag_frequency"]) == {DATA.name: tags}
    assert tags["spotted orange ball"] == len(captions) == 7
    assert json.loads(metadata["ss_dataset_dirs"]) == {DATA.name: {"n_repeats": 1, "img_count": 7}}
    assert metadata["ss_num_train_images"] == "7" and metadata["ss_resolution"] == "(64, 64)"
    assert json.loads(metadata["ss_bucket_info"]) == {"buckets": {"0": {"resolution": [64, 64], "count": 7}}}



def test_training_overfits_one_image_and_leaves_the_base_bit_identical(sd1, one_image_dataset, tmp_path):
    from finetune_core.data.dataset import ImageDataset
    from finetune_core.data.dataset_config import DatasetConfig
    from tests.conftest import weights_checksum

    before = weights_checksum(sd1)
    data = ImageDataset(DatasetConfig(data_dir=str(one_image_dataset), width=64, height=64,
                                      latent_sampling="deterministic"), placeholder="fit")
    data.prepare(sd1)
    latents = data.get_batch(0, 0).latents
    request = _request("fit", steps=40, method={"rank": 8, "alpha": 8.0, "train_text_encoder": True},
                       train={"learning_rate": "0.002", "seed": 1})
    request.data_settings.update(data_dir=str(one_image_dataset), latent_sampling="deterministic")
    result = service.train(request, sd1, service.OutputFolders.standalone(tmp_path))
    trained = build(sd1, "fit", LoraConfig(continue_from=str(result.artifacts[0]), train_text_encoder=True),
                    tmp_path, 0).network.eval()
    loss_before, loss_after = fixed_draw_loss(sd1, latents), fixed_draw_loss(sd1, latents, trained.by_name())
    # fixed draws: the drop is the LoRA's; 40 steps on one image roughly halve it on the tiny model
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    assert weights_checksum(sd1) == before  # the base, bit for bit (values and dtypes)
    assert not any(p.requires_grad or p.grad is not None for m in sd1.trainable_modules().values()
                   for p in m.parameters())


def test_resume_is_exact(sd1, tmp_path):
    full = _train(sd1, tmp_path / "a", "res", steps=4, train={"save_every": 2})
    control = Control()

    def stop_at_two(event):
        if isinstance(event, StepEvent) and event.step == 2:
            control.interrupt()

    folders = service.OutputFolders.standalone(tmp_path / "b")
    stopped = service.train(_request("res", 4, train={"save_every": 2}), sd1, folders, on_event=stop_at_two,
                            control=control)
    assert stopped.interrupted and stopped.step == 2
    resumed = service.train(service.TrainRequest("lora", "res", resume_run=str(stopped.run_dir), overwrite=True),
                            sd1, folders)
    assert resumed.step == 4
    a, b = read_lora(full.artifacts[0]), read_lora(resumed.artifacts[0])
    assert set(a.modules) == set(b.modules)
    assert all(torch.equal(a.modules[k].tensors[p], b.modules[k].tensors[p]) for k in a.modules
               for p in a.modules[k].tensors)


def test_multiplier_zero_is_the_base_model_exactly(sd1, tmp_path):
    method = build(sd1, "zero", LoraConfig(rank=4, train_text_encoder=True, conv_rank=2, preview_multiplier=0.0),
                   tmp_path, 0)
    with torch.no_grad():
        for adapter in method.network.by_name().values():
            adapter.weights["lora_up__weight"].normal_()  # trained: every adapter changes its layer at multiplier 1
    base = outputs(sd1)
    adapters = method.inference_extras().adapters
    with sd1.weight_adapters(adapters):
        zero = outputs(sd1)
    assert torch.equal(zero[0], base[0]) and torch.equal(zero[1], base[1])
    with sd1.weight_adapters(method.network.by_name()):
        assert not torch.allclose(outputs(sd1)[1], base[1])


def test_a_new_lora_starts_as_the_base_model(sd1, tmp_path):
    method = build(sd1, "new", LoraConfig(rank=4, conv_rank=2, train_text_encoder=True), tmp_path, 0)
    assert all(float(a.tensors()["lora_up.weight"].detach().abs().sum()) == 0
               and float(a.tensors()["lora_down.weight"].detach().abs().sum()) > 0
               for a in method.network.by_name().values())  # kohya's init: up = 0
    base = outputs(sd1)
    with sd1.weight_adapters(method.network.by_name()):
        assert torch.equal(outputs(sd1)[1], base[1])


def test_continuing_a_file_keeps_its_layers_and_step(sd1, tmp_path):
    first = _train(sd1, tmp_path, "cont", steps=2, method={"conv_rank": 2})
    again = _train(sd1, tmp_path, "cont", steps=4, method={"continue_from": "cont", "rank": 8})
    assert again.step == 4
    a, b = read_lora(first.artifacts[0]), read_lora(again.artifacts[0])
    assert set(a.modules) == set(b.modules)  # the file's layers and ranks, not the new rank setting
    assert all(b.modules[k].rank == a.modules[k].rank in (2, 4) for k in b.modules)
    assert read_lora(again.artifacts[0]).metadata["ss_steps"] == "4"


@pytest.mark.parametrize("method,match", [
    ({"rank": 0}, "rank is 0"),
    ({"alpha": -1.0}, "alpha is -1.0"),
    ({"conv_rank": 2, "train_unet": False, "train_text_encoder": True}, "only the UNet has convolution"),
    ({"train_unet": False}, "neither the UNet nor the text encoder"),
    ({"module_dropout": 1.0}, "module_dropout is 1.0"),
])
def test_bad_settings_are_refused_before_any_model_loads(method, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        service.validate_request(_request("bad", method=method), service.OutputFolders.standalone(tmp_path))


def test_a_rank_wider_than_a_layer_is_refused(sd1, tmp_path):
    with pytest.raises(ConfigError, match="larger than the layer .* use a rank of at most 32"):
        build(sd1, "wide", LoraConfig(rank=64), tmp_path, 0)


def test_a_file_of_another_family_or_with_foreign_keys_is_refused(sd1, tmp_path):
    from safetensors.torch import save_file

    folders = service.OutputFolders.standalone(tmp_path)
    loras = folders.for_kind("loras")
    random_lora_file(build_tiny("tiny-sdxl"), loras / "xl.safetensors")
    with pytest.raises(ModelMismatchError, match="made for SDXL models and the model to train on is SD1"):
        _train(sd1, tmp_path, "new1", method={"continue_from": "xl"})  # with the request (the model's family)
    unchecked = service.plan(_request("new1", 4, method={"continue_from": "xl"}), folders)  # a host that cannot tell
    with pytest.raises(ModelMismatchError, match="LoRA for SDXL, but the loaded model is SD1"):
        service.train_plan(unchecked, sd1)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
               "bundle_emb.thing.string_to_param.*": torch.zeros(1, 768)}, str(loras / "odd.safetensors"))
    with pytest.raises(ArtifactError, match="module bundle_emb has the parts .* which no network type"):
        _train(sd1, tmp_path, "new2", method={"continue_from": "odd"})


def test_an_existing_name_is_refused_without_overwrite(sd1, tmp_path):
    _train(sd1, tmp_path, "taken", steps=1)
    with pytest.raises(ArtifactError, match="taken.safetensors already exists"):
        service.validate_request(_request("taken"), service.OutputFolders.standalone(tmp_path))
