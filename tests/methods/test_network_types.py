"""Every network type of the LoRA method (`--network`, `--dora`) on the tiny models: a new network is the base model
exactly, a few steps overfit one image, resume is exact, the base stays bit-identical, the file reads back as its
type; and the bad input of the types (a setting of another type, a factor or block count that does not divide a
layer, DoRA without a DoRA form, a file of another type, a file that names no layer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune_core.errors import ConfigError, ModelMismatchError
from finetune_core.formats.lora_file import read_lora
from finetune_core.jobs import service
from finetune_core.methods.lora import LoraConfig, build
from finetune_core.model.tiny import build_tiny
from finetune_core.train.control import Control
from finetune_core.train.events import StepEvent
from tests.conftest import weights_checksum
from tests.methods.lora_files import CASES, TYPE_SETTINGS, config_for, fixed_draw_loss, outputs, random_lora_file

DATA = Path(__file__).resolve().parents[2] / "examples" / "dataset"
IDS = [f"{n}{'-dora' if d else ''}" for n, d in CASES]
# a learning rate per type that moves it in a few steps (per-channel scales and rotations need more than matrices)
RATES = {"lora": "0.003", "loha": "0.003", "lokr": "0.003", "ia3": "0.03", "full": "0.0003", "norm": "0.01",
         "oft": "0.003", "glora": "0.003"}


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("tiny-sd1")


def _request(name, network, dora=False, steps=4, method=None, train=None, data=None):
    settings = {"network": network, "dora": dora, **TYPE_SETTINGS[network], **(method or {})}
    return service.TrainRequest("lora", name, method_settings=settings,
                                data_settings={"data_dir": str(DATA), "width": 64, "height": 64, **(data or {})},
                                train_settings={"steps": steps, "save_every": 0, "preview_every": 0, "csv_every": 0,
                                                "learning_rate": RATES[network], **(train or {})})



@pytest.mark.parametrize("family", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
@pytest.mark.parametrize("network,dora", CASES, ids=IDS)
def test_a_new_network_is_the_base_model_exactly(family, network, dora, tmp_path):
    model = build_tiny(family)
    base = outputs(model)
    method = build(model, "new", config_for(network, dora), tmp_path, 0)
    with model.weight_adapters(method.network.by_name()):
        start = outputs(model)
    assert torch.equal(start[0], base[0]) and torch.equal(start[1], base[1])


# every type on SD1; on SD2 (v-prediction, OpenCLIP's fused attention) and SDXL (two text encoders) a few
OVERFIT = [("tiny-sd1", n, d) for n, d in CASES] + [(f, n, d) for f in ("tiny-sd2", "tiny-sdxl")
                                                   for n, d in (("loha", True), ("oft", False), ("ia3", False))]


@pytest.mark.parametrize("family,network,dora", OVERFIT,
                         ids=[f"{f}-{n}{'-dora' if d else ''}" for f, n, d in OVERFIT])
def test_a_few_steps_overfit_one_image_and_the_base_stays_bit_identical(sd1, one_image_dataset, family, network,
                                                                          dora, tmp_path):
    from finetune_core.data.dataset import ImageDataset
    from finetune_core.data.dataset_config import DatasetConfig

    model = sd1 if family == "tiny-sd1" else build_tiny(family)
    before = weights_checksum(model)
    data = ImageDataset(DatasetConfig(data_dir=str(one_image_dataset), width=64, height=64,
                                      latent_sampling="deterministic"), placeholder="fit")
    data.prepare(model)
    latents = data.get_batch(0, 0).latents
    request = _request("fit", network, dora, steps=20, train={"seed": 1},
                       data={"data_dir": str(one_image_dataset), "latent_sampling": "deterministic"})
    result = service.train(request, model, service.OutputFolders.standalone(tmp_path))
    file = read_lora(result.artifacts[0])
    assert {m.kind for m in file.modules.values()} == {network} and {m.dora for m in file.modules.values()} == {dora}
    assert file.metadata["ss_network_module"] == ("networks.lora" if (network, dora) == ("lora", False)
                                                  else "lycoris.kohya")
    args = json.loads(file.metadata["ss_network_args"])
    assert (args.get("dora_wd"), args.get("wd_on_out")) == (("True", "False") if dora else (None, None))
    config = LoraConfig(continue_from=str(result.artifacts[0]), network=network, dora=dora,
                        train_text_encoder=network != "norm")
    trained = build(model, "fit", config, tmp_path, 0).network.eval()
    loss_before, loss_after = fixed_draw_loss(model, latents), fixed_draw_loss(model, latents, trained.by_name())
    assert loss_after < 0.95 * loss_before, (loss_before, loss_after)
    assert weights_checksum(model) == before  # the base, bit for bit (values and dtypes)


@pytest.mark.parametrize("network,dora", CASES, ids=IDS)
def test_resume_is_exact(sd1, network, dora, tmp_path):
    full = service.train(_request("res", network, dora, train={"save_every": 2}), sd1,
                         service.OutputFolders.standalone(tmp_path / "a"))
    control = Control()

    def stop_at_two(event):
        if isinstance(event, StepEvent) and event.step == 2:
            control.interrupt()

    folders = service.OutputFolders.standalone(tmp_path / "b")
    stopped = service.train(_request("res", network, dora, train={"save_every": 2}), sd1, folders,
                            on_event=stop_at_two, control=control)
    assert stopped.interrupted and stopped.step == 2
    resumed = service.train(service.TrainRequest("lora", "res", resume_run=str(stopped.run_dir), overwrite=True),
                            sd1, folders)
    a, b = read_lora(full.artifacts[0]), read_lora(resumed.artifacts[0])
    assert resumed.step == 4 and set(a.modules) == set(b.modules)
    assert all(torch.equal(a.modules[k].tensors[p], b.modules[k].tensors[p]) for k in a.modules
               for p in a.modules[k].tensors)
    trainable = [p for k in a.modules for p, t in a.modules[k].tensors.items() if p not in ("alpha", "on_input")]
    assert trainable


@pytest.mark.parametrize("network,dora", CASES, ids=IDS)
def test_continuing_a_file_of_every_type_keeps_its_modules_and_step(sd1, network, dora, tmp_path):
    folders = service.OutputFolders.standalone(tmp_path)
    random_lora_file(sd1, folders.for_kind("loras") / "old.safetensors", network=network, dora=dora)
    again = service.train(_request("cont", network, dora, steps=2, method={"continue_from": "old"}), sd1, folders)
    a, b = read_lora(folders.for_kind("loras") / "old.safetensors"), read_lora(again.artifacts[0])
    assert set(a.modules) == set(b.modules) and {m.kind for m in b.modules.values()} == {network}
    assert all(a.modules[k].tensors[p].shape == b.modules[k].tensors[p].shape for k in a.modules
               for p in a.modules[k].tensors)


@pytest.mark.parametrize("method,match", [
    ({"network": "lora", "factor": 4}, "factor is 4, but the LoRA / LoCon network does not use factor"),
    ({"network": "ia3", "rank": 8}, r"rank is 8, but the \(IA\)³ network does not use rank"),
    ({"network": "oft", "conv_rank": 2}, "conv_rank is 2, but the OFT network does not use conv_rank"),
    ({"network": "ia3", "dora": True}, r"dora is True, but the \(IA\)³ network has no DoRA form"),
    ({"network": "norm", "train_text_encoder": True}, "adapts only the UNet's norm layers"),
    ({"network": "lokr", "factor": 0}, "factor is 0"),
    ({"network": "oft", "blocks": 0}, "blocks is 0"),
    ({"network": "boft"}, "network is 'boft'; choose one of lora, loha, ia3, lokr, full, norm, glora, oft"),
])
def test_bad_type_settings_are_refused_before_any_model_loads(method, match, tmp_path):
    request = service.TrainRequest("lora", "bad", method_settings=method,
                                   data_settings={"data_dir": str(DATA), "width": 64, "height": 64})
    with pytest.raises(ConfigError, match=match):
        service.validate_request(request, service.OutputFolders.standalone(tmp_path))


@pytest.mark.parametrize("config,match", [
    (LoraConfig(network="lokr", factor=5), "the LoKr factor 5 does not divide the layer lora_unet_"),
    (LoraConfig(network="oft", blocks=5), "the OFT block count 5 does not divide the width"),
])
def test_a_factor_or_block_count_that_does_not_divide_a_layer_is_refused(sd1, config, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        build(sd1, "x", config, tmp_path, 0)


def test_a_file_of_another_type_or_that_names_no_layer_is_refused(sd1, tmp_path):
    from safetensors.torch import save_file

    folders = service.OutputFolders.standalone(tmp_path)
    loras = folders.for_kind("loras")
    random_lora_file(sd1, loras / "hada.safetensors", network="loha")
    with pytest.raises(ConfigError, match="hada.safetensors is a LoHa file, but the settings train LoRA / LoCon; set "
                                          "network to loha"):
        service.train(_request("x", "lora", method={"continue_from": "hada"}), sd1, folders)
    random_lora_file(sd1, loras / "plain.safetensors", network="lora")
    with pytest.raises(ConfigError, match="has no DoRA magnitudes .* but dora is True"):
        service.train(_request("x", "lora", dora=True, method={"continue_from": "plain"}), sd1, folders)
    save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_nowhere.lora_up.weight": torch.zeros(4, 2)}, str(loras / "stray.safetensors"))
    with pytest.raises(ModelMismatchError, match="none of its 1 modules names a layer of this SD1 model"):
        service.train(_request("x", "lora", method={"continue_from": "stray"}), sd1, folders)


def test_every_save_is_checked_by_the_reader_and_an_unmatched_key_is_a_warning(sd1, monkeypatch, tmp_path):
    from finetune_core.model.interface import NetworkCheck
    from finetune_core.train.events import ArtifactChecked, Warning_

    events = []
    result = service.train(_request("chk", "loha", train={"save_every": 2}), sd1,
                           service.OutputFolders.standalone(tmp_path / "a"), on_event=events.append)
    checks = [e for e in events if isinstance(e, ArtifactChecked)]
    assert [c.step for c in checks] == [2, 4, 4] and all(c.applied == c.total > 0 for c in checks)
    total = checks[-1].total
    assert checks[-1].line == f"chk.safetensors: {total} of {total} modules applied by our reader"
    assert len((result.run_dir / "checks.txt").read_text().splitlines()) == 3
    monkeypatch.setattr(type(sd1), "check_network_file",
                        lambda self, path: NetworkCheck("a loader", 3, 2, ("lora_unet_gone",)), raising=False)
    events.clear()
    service.train(_request("chk", "loha"), sd1, service.OutputFolders.standalone(tmp_path / "b"),
                  on_event=events.append)
    warnings = [e.message for e in events if isinstance(e, Warning_)]
    assert any("chk.safetensors: 1 of 3 modules not applied by a loader (keys lora_unet_gone)" in w for w in warnings)


def test_a_stray_key_is_named_by_the_standalone_check(sd1, tmp_path):
    from safetensors.torch import load_file, save_file

    path = random_lora_file(sd1, tmp_path / "stray.safetensors", network="ia3")
    tensors = load_file(str(path))
    tensors.update({"lora_unet_nowhere.weight": torch.zeros(4), "lora_unet_nowhere.on_input": torch.tensor(0)})
    save_file(tensors, str(path))
    check = sd1.check_network_file(path)
    assert check.unmatched == ("lora_unet_nowhere",) and check.applied == check.total - 1


def test_the_command_line_takes_the_type_flags_and_refuses_a_setting_of_another_type(tmp_path, capsys):
    from finetune_core.cli import main

    code = main(["train", "lora", "--model", "tiny-sd1", "--name", "x", "--data", str(DATA), "--output-dir",
                 str(tmp_path), "--network", "lora", "--factor", "4"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "factor is 4, but the LoRA / LoCon network" in err
    assert not (tmp_path / "models").exists()
    code = main(["train", "lora", "--model", "tiny-sd1", "--name", "kr", "--data", str(DATA), "--output-dir",
                 str(tmp_path), "--network", "lokr", "--factor", "4", "--dora", "--steps", "1", "--width", "64",
                 "--height", "64", "--preview-every", "0", "--save-every", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "checked kr.safetensors: " in captured.err + captured.out and "modules applied by our reader" in \
        captured.err + captured.out
    assert read_lora(tmp_path / "models" / "Lora" / "kr.safetensors").metadata["ss_network_args"].count('"algo"')
