"""LoRA inside the WebUI (on the stand-in): a file we write, of every network type (with and without DoRA where it has
one), loads with the built-in Lora extension's v1.10.1 naming, module-type and maths rules (every key matches a module
of the SD1 / SD2 / SDXL model, none is skipped) and its merge equals our own application; a trained LoRA is listed
after the refresh and `<lora:NAME:1>` changes txt2img's output; the job leaves nothing behind on the model; in
DreamBooth mode its class images come from the WebUI's txt2img."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_webui_training import run
from webui_runs import request, same_weights, snapshot

from finetune_core.formats.lora_file import read_lora
from finetune_core.jobs import service
from tests.methods.lora_files import CASES, our_network, outputs, random_lora_file

FAMILIES = ["sd1", "sd2", "sdxl"]


def _build(family):
    import tiny_webui_model
    import tiny_webui_sdxl

    from finetune_core.model.webui_backend import WebUIModel

    sd_model = {"sd1": tiny_webui_model.build_sd1, "sd2": tiny_webui_sdxl.build_sd2,
                "sdxl": tiny_webui_sdxl.build_sdxl}[family]()
    return WebUIModel(sd_model)


def _leftovers(sd_model):
    """Hooks, parametrizations or replaced classes the job could have left on any module."""
    from torch.nn.utils import parametrize

    return [name for name, m in sd_model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or parametrize.is_parametrized(m)
            or "forward" in vars(m) or type(m).__name__.startswith("Parametrized")]


@pytest.mark.parametrize("network,dora", CASES, ids=[f"{n}{'-dora' if d else ''}" for n, d in CASES])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_webui_loads_every_key_and_merges_what_we_apply(webui, family, network, dora, tmp_path):
    import networks

    model = _build(family)
    lora_dir = tmp_path / "models" / "Lora"
    webui.cmd_opts.lora_dir = str(lora_dir)
    path = random_lora_file(model, lora_dir / "style.safetensors", network=network, dora=dora)
    base = outputs(model)
    with model.weight_adapters(our_network(model, path, multiplier=0.7).by_name()):
        ours = outputs(model)

    networks.list_available_networks()
    entry = networks.available_networks["style"]
    assert entry.alias == "style" and entry.sd_version == {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}[family]
    net = networks.load_network("style", entry)
    assert net.keys_failed_to_match == {}  # every key names a module of this model
    assert len(net.modules) == len(read_lora(path).modules)
    kinds = {type(m).__name__ for m in net.modules.values()}
    assert kinds == {_WEBUI_TYPES[network]}  # the WebUI takes every module as the type we wrote
    networks.load_networks(["style"], [0.7], [0.7], [None])
    merged = outputs(model)  # the patched forwards merge the LoRA into the weights on first use
    # float32 merged (W + d) x against W x + d x: rounding only, relative to the outputs' size
    for a, b in zip(merged, ours):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))
    assert not torch.allclose(merged[1], base[1])
    assert network == "norm" or not torch.allclose(merged[0], base[0])  # the text encoders changed too
    networks.load_networks([])
    torch.testing.assert_close(outputs(model)[1], base[1], rtol=0, atol=1e-6)


_WEBUI_TYPES = {"lora": "NetworkModuleLora", "loha": "NetworkModuleHada", "lokr": "NetworkModuleLokr",
                 "ia3": "NetworkModuleIa3", "full": "NetworkModuleFull", "norm": "NetworkModuleNorm",
                 "glora": "NetworkModuleGLora", "oft": "NetworkModuleOFT"}


def _generate(sd_model, prompt):
    """txt2img as the WebUI runs it for a user (extra networks on), one fixed seed."""
    from modules import processing

    p = processing.StableDiffusionProcessingTxt2Img(sd_model=sd_model, prompt=[prompt], negative_prompt=[""],
                                                    batch_size=1, steps=3, cfg_scale=7.0, width=64, height=64, seed=3)
    return np.asarray(processing.process_images_inner(p).images[0]).astype(int)


def test_a_trained_lora_is_listed_after_the_refresh_and_changes_txt2img(webui, sd1, extension, dataset, tmp_path):
    import networks

    model = extension.EXTENSION.host.get_model()
    before = snapshot(sd1)
    networks.list_available_networks()
    assert "shiny" not in networks.available_networks
    folders = extension.EXTENSION.host.folders()
    assert folders.for_kind("loras") == tmp_path / "models" / "Lora"  # cmd_opts.lora_dir (preload.py's default)
    job = request(dataset, "lora", "shiny", steps=3, method_settings={"rank": 4, "alpha": 4})
    job.train_settings["learning_rate"] = "0.05"
    result = service.train(job, model, folders)
    extension.EXTENSION.host.artifacts_written("loras", result.artifacts)  # what the job runner does after a job
    assert "shiny" in networks.available_networks  # listed without a restart
    assert extension.EXTENSION.host.list_existing("loras") == ["shiny"]
    assert same_weights(sd1, before) and not _leftovers(sd1)

    plain = _generate(sd1, "a red thing")
    assert np.abs(_generate(sd1, "a red thing <lora:shiny:1>") - plain).sum() > 0
    assert np.array_equal(_generate(sd1, "a red thing <lora:shiny:0>"), plain)  # multiplier 0: the base exactly
    assert np.array_equal(_generate(sd1, "a red thing"), plain)  # no tag: the extension restores the weights


def test_a_job_over_a_merged_lora_trains_on_the_plain_model_and_leaves_nothing(webui, sd1, dataset, tmp_path):
    import networks

    from finetune_core.model.webui_backend import WebUIModel

    model = WebUIModel(sd1)
    webui.cmd_opts.lora_dir = str(tmp_path / "models" / "Lora")
    random_lora_file(model, tmp_path / "models" / "Lora" / "other.safetensors")
    before = snapshot(sd1)
    flags = {name: p.requires_grad for name, p in sd1.named_parameters()}
    networks.load_networks(["other"])
    merged = outputs(model)
    job = request(dataset, "lora", "fresh", steps=2, method_settings={"rank": 2, "train_text_encoder": True})
    job.train_settings["preview_every"] = 1
    job.train_settings["preview_steps"] = 2
    result = service.train(job, model, service.OutputFolders.standalone(tmp_path / "out"))
    assert result.step == 2 and (tmp_path / "out" / "models" / "Lora" / "fresh.preview.png").is_file()
    assert not _leftovers(sd1)
    assert {name: p.requires_grad for name, p in sd1.named_parameters()} == flags
    assert [net.name for net in networks.loaded_networks] == ["other"]  # the user's LoRA is back for generation
    torch.testing.assert_close(outputs(model)[1], merged[1], rtol=0, atol=1e-6)
    networks.load_networks([])
    outputs(model)
    assert same_weights(sd1, before)


def test_dreambooth_mode_makes_class_images_with_txt2img_and_lists_the_lora(webui, sd1, extension, dataset,
                                                                            tmp_path, monkeypatch):
    """LoRA in DreamBooth mode through the extension's job runner: the class images come from the WebUI's own
    txt2img (its sampler, the class prompt), the LoRA is listed after the job, and the model is as it was."""
    import networks
    from modules import processing

    webui.cmd_opts.lora_dir = str(tmp_path / "models" / "Lora")
    before = snapshot(sd1)
    made, inner = [], processing.process_images_inner
    monkeypatch.setattr(processing, "process_images_inner",
                        lambda p: made.append((list(p.prompt), p.sampler_name)) or inner(p))
    job = request(dataset, "lora", "mydog", steps=2, method_settings={
        "rank": 2, "instance_prompt": "a photo of [name] thing", "instance_token": "sks",
        "prior_preservation": True, "class_prompt": "a photo of a thing", "class_images": 2, "class_steps": 2,
        "class_sampler": "Euler a", "class_batch_size": 2})
    state, recorder = run(extension, job)
    assert state.status == "finished", (state.error, state.messages)
    assert made == [(["a photo of a thing"] * 2, "Euler a")]  # one txt2img batch, nothing else sampled
    assert any(r[0] == "Phase" and "class images" in r[3] for r in recorder.rows)  # the WebUI's progress text
    classes = Path(webui.cmd_opts.data_dir) / "outputs" / "finetune" / "lora" / "class_images" / "a_photo_of_a_thing"
    assert len(list(classes.glob("*.png"))) == 2 and (classes / "class_images.json").is_file()
    assert state.artifacts == [tmp_path / "models" / "Lora" / "mydog.safetensors"]
    assert read_lora(state.artifacts[0]).metadata["ss_num_reg_images"] == "2"
    assert "mydog" in networks.available_networks  # listed without a restart
    assert same_weights(sd1, before) and not _leftovers(sd1)


@pytest.mark.parametrize("network,settings", [("lokr", {"factor": 4, "dora": True}), ("oft", {"blocks": 4}),
                                              ("norm", {})])
def test_every_save_is_loaded_by_the_extension_and_every_module_applies(webui, sd1, extension, dataset, network,
                                                                        settings, tmp_path):
    from finetune_core.train.events import ArtifactChecked, Warning_

    model = extension.EXTENSION.host.get_model()
    job = request(dataset, "lora", f"typed-{network}", steps=2, method_settings={"network": network, **settings})
    job.train_settings.update(save_every=1, learning_rate="0.01")
    events = []
    result = service.train(job, model, extension.EXTENSION.host.folders(), on_event=events.append)
    checks = [e for e in events if isinstance(e, ArtifactChecked)]
    assert [c.step for c in checks] == [1, 2, 2]  # two intermediate copies and the final file
    assert all(c.loader == "the WebUI's Lora extension" and c.applied == c.total > 0 and not c.unmatched
               for c in checks)
    assert not [e for e in events if isinstance(e, Warning_) and "not applied" in e.message]
    recorded = (result.run_dir / "checks.txt").read_text().splitlines()
    assert recorded[-1] == f"step 2: typed-{network}.safetensors: {checks[-1].total} of {checks[-1].total} modules " \
                           f"applied by the WebUI's Lora extension"
    plain = _generate(sd1, "a red thing")
    assert np.abs(_generate(sd1, f"a red thing <lora:typed-{network}:1>") - plain).sum() > 0


def test_a_key_the_extension_cannot_match_is_named(webui, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _build("sd1")
    webui.cmd_opts.lora_dir = str(tmp_path)
    path = random_lora_file(model, tmp_path / "stray.safetensors", network="loha")
    tensors = load_file(str(path))
    tensors.update({f"lora_unet_nowhere.{k.partition('.')[2]}": v.clone() for k, v in tensors.items()
                    if k.startswith("lora_unet_down_blocks_0_attentions_0_proj_in.")})
    save_file(tensors, str(path))
    check = model.check_network_file(path)
    assert check.unmatched == ("lora_unet_nowhere",) and check.applied == check.total - 1
