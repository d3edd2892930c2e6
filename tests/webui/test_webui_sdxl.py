"""The WebUI backend on a tiny SDXL model shaped like the WebUI's (sgm DiffusionEngine, GeneralConditioner with the
hijacked CLIP-L and OpenCLIP-bigG wrappers and the size/crop embedders): the contract suite, TI and HN runs, and
--medvram placement with the hook on the whole conditioner."""

from __future__ import annotations

import pytest
import torch
from test_webui_placement import _hook_count
from webui_runs import same_weights, snapshot, spy_on_steps, train

from finetune_core.formats.embedding import read_embedding
from finetune_core.model.interface import EPSILON, SDXL
from finetune_core.model.webui_backend import WebUIModel
from tests.model.test_contract import *  # noqa: F403  (the shared DiffusionModel contract suite)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from modules import devices, sd_hijack, shared

    shared.reset(str(tmp_path_factory.mktemp("webui")))
    devices.device = torch.device("cpu")
    sd_hijack.new_model_hijack()
    import tiny_webui_sdxl

    backend = WebUIModel(tiny_webui_sdxl.build_sdxl())
    return backend


def test_sdxl_stub_is_shaped_like_the_webui(model):
    sd = model.sd_model
    names = [type(e).__name__ for e in sd.conditioner.embedders]
    assert names == ["FrozenCLIPEmbedderForSDXLWithCustomWords", "FrozenOpenCLIPEmbedder2WithCustomWords"] + \
        ["ConcatTimestepEmbedderND"] * 3
    assert sd.cond_stage_model is sd.conditioner and sd.is_sdxl and sd.scale_factor == 0.13025
    g = sd.conditioner.embedders[1]
    assert g.wrapped.model.token_embedding.textual_inversion_key == "clip_g" and g.id_pad == 0
    cond = sd.get_learned_conditioning(["a cat"])
    assert cond["crossattn"].shape == (1, 77, 2048) and cond["vector"].shape == (1, 2816)
    assert model.family == SDXL and model.prediction_type == EPSILON


def test_sdxl_vector_matches_the_conditioner(model):
    """predict's `y` (pooled ⧺ size embeddings) is what the WebUI's conditioner builds for the same sizes."""
    with torch.no_grad():
        cond = model.encode_prompts(["a cat"])
        webui = model.sd_model.get_learned_conditioning(["a cat"])
        x = torch.zeros(1, 4, 128, 128)  # 1024 px: the WebUI's default size
        ours = model._vector(cond, torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]), x)
    torch.testing.assert_close(ours, webui["vector"].float(), rtol=1e-5, atol=1e-5)


def test_sdxl_ti_and_hn_runs_leave_the_model_unchanged(model, dataset, tmp_path):
    before = snapshot(model.sd_model)
    ti = train(model, dataset, tmp_path, "textual-inversion", "xlemb")
    assert ti.step == 2 and not ti.interrupted
    emb = read_embedding(ti.artifacts[0])
    assert emb.vectors["clip_l"].shape == (2, 768) and emb.vectors["clip_g"].shape == (2, 1280)
    init = model.token_vectors("cat")
    for key in ("clip_l", "clip_g"):  # both halves trained away from the init text
        assert not torch.allclose(emb.vectors[key][0], init[key][0]), key
    hn = train(model, dataset, tmp_path, "hypernetwork", "xlhn")
    assert hn.step == 2 and hn.artifacts[0].is_file()
    state = torch.load(hn.artifacts[0], map_location="cpu", weights_only=False)
    assert 2048 in state and state[2048][0]
    assert same_weights(model.sd_model, before)


def test_sdxl_medvram_step_fires_no_hook_and_hooks_work_afterwards(webui, dataset, tmp_path, monkeypatch):
    from modules import lowvram

    webui.cmd_opts.medvram_sdxl = True
    import tiny_webui_sdxl

    sd = tiny_webui_sdxl.build_sdxl()
    assert sd.lowvram and _hook_count(sd.conditioner) == 1 and len(sd.conditioner._forward_pre_hooks) == 1
    hooks_before, before = _hook_count(sd), snapshot(sd)
    fired_inside, resident = spy_on_steps(monkeypatch)
    result = train(WebUIModel(sd), dataset, tmp_path, "textual-inversion", "xlmed")
    assert result.step == 2
    assert len(fired_inside) >= 2 and all(calls == [] for calls in fired_inside), fired_inside
    assert resident and all(r["unet"] == "device" and r["text"] == "device" and r["vae"] == "cpu"
                            for r in resident), resident
    assert lowvram.module_in_gpu is None and _hook_count(sd) == hooks_before and same_weights(sd, before)
    calls = len(lowvram.hook_calls)
    with torch.no_grad():
        cond = sd.get_learned_conditioning(["a cat"])
        assert lowvram.module_in_gpu is sd.conditioner and lowvram.location["text"] == "device"
        x = torch.randn(1, 4, 8, 8)
        sd.apply_model(x, torch.tensor([10]), cond)
        assert lowvram.module_in_gpu is sd.model and lowvram.location["text"] == "cpu"
        sd.decode_first_stage(x)
    assert len(lowvram.hook_calls) > calls and lowvram.location["vae"] == "device"


def test_sdxl_medvram_backend_outside_a_step(webui):
    """Outside a step the UNet goes through the hooked OpenAIWrapper; the VAE moments need no hook."""
    from modules import lowvram

    webui.cmd_opts.medvram_sdxl = True
    import tiny_webui_sdxl

    model = WebUIModel(tiny_webui_sdxl.build_sdxl())
    with torch.no_grad():
        cond = model.encode_prompts(["a cat"])
        assert lowvram.module_in_gpu is model.sd_model.conditioner
        out = model.predict(torch.randn(1, 4, 8, 8), torch.tensor([5]), cond)
        assert lowvram.module_in_gpu is model.sd_model.model and out.shape == (1, 4, 8, 8)
        calls = len(lowvram.hook_calls)
        moments = model.encode_images(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert len(lowvram.hook_calls) == calls and lowvram.location["vae"] == "cpu" and lowvram.module_in_gpu is None
    assert moments.mean.shape == (1, 4, 8, 8) and bool((moments.std > 0).all())
    assert model.decode_latents(moments.mean).shape == (1, 3, 64, 64) and lowvram.location["vae"] == "device"


def test_sdxl_refiner_is_refused_with_a_sentence(webui):
    from tiny_webui_sdxl import build_sdxl

    from finetune_core.errors import ModelMismatchError

    refiner = build_sdxl()
    refiner.conditioner.embedders = torch.nn.ModuleList(
        [e for i, e in enumerate(refiner.conditioner.embedders) if i != 0])  # the refiner has only OpenCLIP-G
    with pytest.raises(ModelMismatchError, match="refiner"):
        WebUIModel(refiner)
