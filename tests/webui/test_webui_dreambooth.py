"""DreamBooth inside the WebUI stand-in: it trains the loaded checkpoint (SD1 / SD2-v / SDXL), writes a checkpoint
over the loaded file's own, the WebUI lists it after the extension's refresh, and the loaded model is bit for bit
what it was after a finished, an interrupted and a failed run; under --medvram no low-VRAM hook fires inside a step;
class images come from the WebUI's own txt2img."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_webui_placement import _hook_count
from test_webui_training import run, weights_checksum
from webui_runs import same_weights, snapshot, spy_on_steps

from finetune_core.formats.checkpoint import read_state_dict, write_checkpoint
from finetune_core.jobs import service
from finetune_core.model.webui_backend import WebUIModel

V_YAML = 'model:\n  params:\n    parameterization: "v"\n'


def write_source(sd_model) -> Path:
    """The loaded model's checkpoint file, as the WebUI loaded it (with schedule buffers and an EMA entry)."""
    model = WebUIModel(sd_model)
    state = model.ldm_state_dict((*model.trainable_modules(), "vae"))
    state.update({"alphas_cumprod": sd_model.alphas_cumprod.clone(), "model_ema.decay": torch.tensor(0.9999)})
    return write_checkpoint(state, sd_model.sd_checkpoint_info.filename)


def db_request(dataset, name="mydb", steps=2, **method) -> service.TrainRequest:
    return service.TrainRequest("dreambooth", name, {"instance_prompt": "a photo of [name]", **method},
                                {"data_dir": str(dataset), "width": 64, "height": 64},
                                {"steps": steps, "learning_rate": "1e-4", "save_every": 0, "preview_every": 0,
                                 "csv_every": 0})


def test_sd1_run_through_the_extension_lists_the_checkpoint_and_leaves_the_model(extension, sd1, dataset, webui,
                                                                                  monkeypatch):
    import io

    from modules import processing, sd_models, shared

    console = io.StringIO()
    monkeypatch.setattr(shared, "progress_print_out", console)
    source = write_source(sd1)
    before = weights_checksum(sd1)
    state, recorder = run(extension, db_request(dataset, prior_preservation=True, class_prompt="a photo of a thing",
                                                class_images=2, class_steps=2, class_sampler="Euler a"))
    assert state.status == "finished", (state.error, state.messages)
    out = Path(sd_models.model_path()) / "mydb.safetensors"
    assert state.artifacts == [out]
    assert "refresh_checkpoints" in webui.calls
    assert any(title.startswith("mydb.safetensors") for title in sd_models.checkpoint_tiles())
    assert weights_checksum(sd1) == before
    written, original = read_state_dict(out), read_state_dict(source)
    assert set(written) == set(original)
    assert torch.equal(written["model_ema.decay"], original["model_ema.decay"])
    assert not torch.equal(written["model.diffusion_model.out.2.weight"].float(),
                           original["model.diffusion_model.out.2.weight"])
    assert any(r[0] == "Phase" and "class images" in r[3] for r in recorder.rows)  # the WebUI's progress text
    assert "Fine-tune: class images" in console.getvalue()  # and the preparation's bar in the console
    assert len(list((Path(webui.cmd_opts.data_dir) / "outputs" / "finetune" / "dreambooth" / "class_images")
                    .rglob("*.png"))) == 2
    # generation works at once, with the model as it was
    p = processing.StableDiffusionProcessingTxt2Img(sd_model=sd1, prompt=["a cat"], negative_prompt=[""],
                                                    batch_size=1, steps=2, width=64, height=64, seed=1)
    assert processing.process_images_inner(p).images


def test_sd1_interrupted_and_failed_runs_leave_the_model(extension, sd1, dataset, webui, monkeypatch):
    from finetune_core.methods.dreambooth import DreamBooth

    write_source(sd1)
    before = weights_checksum(sd1)
    state, _ = run(extension, db_request(dataset, name="stopped", steps=50),
                   on_step=lambda e: webui.state.interrupt())
    assert state.status == "interrupted" and state.step <= 2 and state.artifacts[0].is_file()
    assert weights_checksum(sd1) == before

    def broken(self):
        raise RuntimeError("the disk went away")
    monkeypatch.setattr(DreamBooth, "checkpoint_state", broken)
    webui.state.interrupted = False
    state, _ = run(extension, db_request(dataset, name="failed"))
    assert state.status == "failed" and "the disk went away" in state.error
    assert weights_checksum(sd1) == before
    assert not (Path(webui.cmd_opts.data_dir) / "models" / "Stable-diffusion" / "failed.safetensors").exists()


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_sd2_and_sdxl_finished_interrupted_failed_leave_the_model(family, webui, dataset, tmp_path, monkeypatch):
    import tiny_webui_sdxl

    from finetune_core.methods.dreambooth import DreamBooth
    from finetune_core.train.control import Control
    from finetune_core.train.events import StepEvent

    sd = tiny_webui_sdxl.build_sd2() if family == "sd2" else tiny_webui_sdxl.build_sdxl()
    source = write_source(sd)
    if family == "sd2":  # the WebUI remembers the yaml it built the model from (here: the SD2-v config)
        sd.used_config = str(tmp_path / "v2-inference-v.yaml")
        Path(sd.used_config).write_text(V_YAML)
    before = snapshot(sd)
    folders = service.OutputFolders.standalone(tmp_path / "out")
    result = service.train(db_request(dataset, train_text_encoder=True), WebUIModel(sd), folders)
    assert same_weights(sd, before)
    assert set(read_state_dict(result.artifacts[0])) == set(read_state_dict(source))
    yaml = result.artifacts[0].with_suffix(".yaml")
    assert (family == "sd2") == yaml.is_file() and (family != "sd2" or yaml.read_text() == V_YAML)

    control = Control()
    stopped = service.train(db_request(dataset, name="stopped", steps=20), WebUIModel(sd), folders,
                            on_event=lambda e: control.interrupt() if isinstance(e, StepEvent) else None,
                            control=control)
    assert stopped.interrupted and same_weights(sd, before)

    def broken(self, model, batch):
        raise RuntimeError("a bug in a step")
    monkeypatch.setattr(DreamBooth, "loss", broken)
    with pytest.raises(RuntimeError, match="a bug in a step"):
        service.train(db_request(dataset, name="failed", train_text_encoder=True), WebUIModel(sd), folders)
    assert same_weights(sd, before)


def test_medvram_trains_with_the_placement_discipline(webui, dataset, tmp_path, monkeypatch):
    from modules import lowvram

    webui.cmd_opts.medvram = True
    import tiny_webui_model

    sd = tiny_webui_model.build_sd1()
    write_source(sd)
    hooks_before, before = _hook_count(sd), snapshot(sd)
    fired_inside, resident = spy_on_steps(monkeypatch)
    result = service.train(db_request(dataset, train_text_encoder=True), WebUIModel(sd),
                           service.OutputFolders.standalone(tmp_path / "out"))
    assert result.step == 2 and result.artifacts[0].is_file()
    assert fired_inside and all(calls == [] for calls in fired_inside), fired_inside
    assert resident and all(r["unet"] == "device" and r["text"] == "device" for r in resident), resident
    assert lowvram.module_in_gpu is None and _hook_count(sd) == hooks_before and same_weights(sd, before)
    calls = len(lowvram.hook_calls)
    with torch.no_grad():
        sd.get_learned_conditioning(["a cat"])
    assert len(lowvram.hook_calls) > calls  # the hooks move modules for generation as before
