"""Where the real WebUI v1.10.1 is less kind than a simple stand-in, and what a job must do about it:
gradient flags on the loaded UNet, queries that must change nothing, fp16 and manual-cast precision, gradient
checkpointing, placement once per phase, state the last generation left (hypernetworks, merged LoRAs, a replaced
UNet, FP8 weights), and previews through the WebUI's own txt2img."""

from __future__ import annotations

import pytest
import torch
from test_webui_training import run, ti_request, weights_checksum
from webui_runs import request, train

from finetune_core.errors import ModelMismatchError
from finetune_core.model.webui_backend import WebUIModel


def grad_flags(sd_model) -> dict[str, bool]:
    return {k: p.requires_grad for k, p in sd_model.named_parameters()}


def test_the_stub_leaves_unet_gradients_on_as_the_webui_does(sd1):
    flags = grad_flags(sd1)
    assert all(v for k, v in flags.items() if k.startswith("model.diffusion_model."))
    assert not any(v for k, v in flags.items() if k.startswith(("first_stage_model.", "cond_stage_model.")))


def test_a_job_freezes_the_unet_and_gives_every_flag_back(extension, sd1, dataset):
    before, checksum = grad_flags(sd1), weights_checksum(sd1)
    during = []
    state, _ = run(extension, ti_request(dataset, steps=2),
                   on_step=lambda e: during.append(any(p.requires_grad for p in sd1.model.parameters())))
    assert state.status == "finished", (state.error, state.messages)
    assert during == [False, False]  # no UNet gradient is computed or kept during the steps
    assert grad_flags(sd1) == before and weights_checksum(sd1) == checksum
    assert all(p.grad is None for p in sd1.parameters())


@pytest.fixture()
def half_sd1(webui):
    """The tiny SD1 model loaded without --no-half: weights in fp16, as most users run the WebUI."""
    import tiny_webui_model

    webui.cmd_opts.no_half = False
    return tiny_webui_model.build_sd1()


def test_estimate_memory_changes_nothing(extension, half_sd1, monkeypatch):
    from finetune_core.jobs import fit, service
    from finetune_core.ui.actions import MethodActions
    from finetune_core.ui.method_tab import method_sections

    host = extension.EXTENSION.host
    before, flags = weights_checksum(half_sd1), grad_flags(half_sd1)
    spec = service.method_spec("hypernetwork")
    actions = MethodActions(host, extension.EXTENSION.runner, service, spec.key, spec.output_kind,
                            method_sections(spec, service))
    monkeypatch.setattr(fit, "can_measure", lambda: False)  # the WebUI has no diffusers to build the architecture
    text, plan = actions.estimate({"method": {}, "data": {"width": 64, "height": 64}, "train": {}})
    assert "run `python -m finetune_core estimate` in the standalone install" in text and plan == {}
    assert weights_checksum(half_sd1) == before and grad_flags(half_sd1) == flags
    assert next(half_sd1.model.parameters()).dtype == torch.float16


def test_an_fp16_model_computes_in_fp16_whatever_the_job_asks(half_sd1):
    from finetune_core.model.interface import TrainingSetup
    from finetune_core.train.step import needs_loss_scaling

    with WebUIModel(half_sd1).training_session(TrainingSetup(precision="fp32")) as session:
        assert session.compute_dtype == torch.float16
    assert needs_loss_scaling(torch.device("cuda"), torch.float16)
    assert not needs_loss_scaling(torch.device("cuda"), torch.float32)
    assert not needs_loss_scaling(torch.device("cpu"), torch.float16)


def test_manual_cast_never_rounds_trained_weights_to_half(extension, half_sd1, dataset, webui, tmp_path):
    """On GTX 16xx / MPS / XPU the WebUI casts every Linear to fp16 and back around its forward; trained float32
    layers (here a hypernetwork's) would be rounded to fp16 at every step."""
    from modules import devices

    from finetune_core.formats.hypernetwork_file import read_hypernetwork

    devices.manual_cast_device = True
    devices.dtype = devices.dtype_inference = torch.float16
    req = ti_request(dataset, steps=3, name="castnet", method="hypernetwork",
                     method_settings={"sizes": "768", "weight_init": "XavierNormal"})
    state, _ = run(extension, req)
    assert state.status == "finished", (state.error, state.messages)
    weight = read_hypernetwork(state.artifacts[0]).layers[768][0]["linear.0.weight"]
    assert not torch.equal(weight, weight.half().float())  # float32 values, not fp16 ones
    assert torch.nn.Linear.forward.__name__ != "forward_wrapper"  # no manual cast left patched


def test_gradient_checkpointing_recomputes_the_transformer_blocks(sd1, dataset, tmp_path):
    from tiny_webui_model import BasicTransformerBlock

    from finetune_core.jobs import service

    model = WebUIModel(sd1)
    calls = {}
    for on in (False, True):
        req = request(dataset, "textual-inversion", f"ck{int(on)}", steps=1)
        req.train_settings["gradient_checkpointing"] = on
        BasicTransformerBlock.forward_calls = 0
        service.train(req, model, service.OutputFolders.standalone(tmp_path / f"o{int(on)}"))
        calls[on] = BasicTransformerBlock.forward_calls
    assert calls[True] == 2 * calls[False] > 0  # each block runs again in backward
    assert all("forward" not in vars(m) for m in sd1.modules())  # the wrappers are gone afterwards


@pytest.mark.parametrize("flag", ["medvram", "lowvram"])
def test_placement_moves_the_unet_once_per_job_not_once_per_step(flag, webui, dataset, tmp_path):
    import tiny_webui_model
    from modules import lowvram

    setattr(webui.cmd_opts, flag, True)
    sd = tiny_webui_model.build_sd1()
    lowvram.moves.clear()
    result = train(WebUIModel(sd), dataset, tmp_path, "textual-inversion", "moves", steps=4)
    assert result.step == 4
    unet_in = [m for m in lowvram.moves if m == ("unet", "device")]
    assert len(unet_in) == 1, lowvram.moves


def test_training_sets_aside_the_last_generations_hypernetwork(extension, sd1, dataset, webui):
    class UsersHypernetwork:
        name = "users"
        layers: dict = {}

    users = [UsersHypernetwork()]
    webui.loaded_hypernetworks = users
    seen = []
    state, _ = run(extension, ti_request(dataset, steps=2),
                   on_step=lambda e: seen.append(list(webui.loaded_hypernetworks)))
    assert state.status == "finished", (state.error, state.messages)
    assert seen == [[], []] and webui.loaded_hypernetworks is users


def test_training_runs_on_the_plain_weights_under_a_merged_lora(extension, sd1, dataset):
    import networks

    layer = sd1.model.diffusion_model.input_blocks[0][0]  # a Conv2d the "LoRA" changes
    plain = layer.weight.detach().clone()
    lora = networks.Network("style", {layer.network_layer_name: networks.ConstantModule(0.5)})
    networks.activate([lora])
    with torch.no_grad():  # a generation with <lora:style:1> merges it into the weights
        sd1.apply_model(torch.zeros(1, 4, 8, 8), torch.tensor([10]), sd1.get_learned_conditioning(["a cat"]))
    torch.testing.assert_close(layer.weight, plain + 0.5)
    seen = []
    state, _ = run(extension, ti_request(dataset, steps=2), on_step=lambda e: seen.append(layer.weight.clone()))
    assert state.status == "finished", (state.error, state.messages)
    assert all(torch.equal(w, plain) for w in seen)  # the embedding learned the plain checkpoint
    assert networks.loaded_networks == [lora]
    with torch.no_grad():  # the next generation with the LoRA merges it again; without, the weights stay plain
        sd1.apply_model(torch.zeros(1, 4, 8, 8), torch.tensor([10]), sd1.get_learned_conditioning(["a cat"]))
    torch.testing.assert_close(layer.weight, plain + 0.5)
    networks.activate([])
    with torch.no_grad():
        sd1.apply_model(torch.zeros(1, 4, 8, 8), torch.tensor([10]), sd1.get_learned_conditioning(["a cat"]))
    assert torch.equal(layer.weight, plain)


def test_a_replaced_unet_or_fp8_weights_are_refused_with_a_sentence(extension, sd1, dataset, webui):
    from modules import devices, sd_unet

    from finetune_core.model.interface import TrainingSetup

    class TensorRT(sd_unet.SdUnet):
        option = type("Option", (), {"label": "TRT sd15"})()

    sd_unet.current_unet = TensorRT()
    state, _ = run(extension, ti_request(dataset, steps=2))
    assert state.status == "failed" and "SD Unet" in state.error and "TRT sd15" in state.error
    sd_unet.current_unet = None
    devices.fp8 = True
    with pytest.raises(ModelMismatchError, match="FP8 weight"):
        with WebUIModel(sd1).training_session(TrainingSetup()):
            pass


def test_previews_come_from_the_webuis_txt2img_with_fresh_conditioning(webui, dataset, tmp_path):
    import tiny_webui_model
    from modules import lowvram, processing, sd_models

    from finetune_core.jobs import service

    webui.cmd_opts.medvram = True
    sd = tiny_webui_model.build_sd1()
    stale = ("stale", "entry")
    processing.StableDiffusionProcessing.cached_c = [stale, None]
    req = request(dataset, "textual-inversion", "previewed", steps=2)
    req.train_settings.update(preview_every=1, preview_steps=2, preview_prompt="a photo of previewed")
    lowvram.hook_calls.clear()
    result = service.train(req, WebUIModel(sd), service.OutputFolders.standalone(tmp_path / "out"))
    images = sorted((result.run_dir / "images").glob("*.png"))
    assert [p.name for p in images] == ["previewed-1.png", "previewed-2.png"]
    assert processing.StableDiffusionProcessing.cached_c == [None, None]  # ours or stale: none is left behind
    assert sd_models.reload_calls == []  # a preview never reloads the checkpoint
    assert "vae" in lowvram.hook_calls  # generation ran with the WebUI's own hooks


def test_ldm_state_dict_is_the_checkpoint_layout(sd1):
    model = WebUIModel(sd1)
    exported = model.ldm_state_dict(("unet", "text_encoder"))
    loaded = {k.replace(".wrapped", ""): v for k, v in sd1.state_dict().items()
              if k.startswith(("model.diffusion_model.", "cond_stage_model."))}
    assert set(exported) == set(loaded)
    assert all(torch.equal(exported[k], loaded[k].cpu()) for k in exported)
