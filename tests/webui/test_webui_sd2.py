"""The WebUI backend on a tiny SD2-v model shaped like the WebUI's (ldm LatentDiffusion, parameterization "v",
the hijacked OpenCLIP-H wrapper with pad id 0 and the penultimate layer): the contract suite, TI and HN runs."""

from __future__ import annotations

import pytest
import torch
from webui_runs import same_weights, snapshot, train

from finetune_core.formats.embedding import read_embedding
from finetune_core.model.interface import SD2, V_PREDICTION
from tests.model.test_contract import *  # noqa: F403  (the shared DiffusionModel contract suite)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from modules import devices, sd_hijack, shared

    shared.reset(str(tmp_path_factory.mktemp("webui")))
    devices.device = torch.device("cpu")
    sd_hijack.new_model_hijack()
    import tiny_webui_sdxl

    from finetune_core.model.webui_backend import WebUIModel

    backend = WebUIModel(tiny_webui_sdxl.build_sd2())
    return backend


def test_sd2_stub_is_shaped_like_the_webui(model):
    sd = model.sd_model
    assert type(sd.cond_stage_model).__name__ == "FrozenOpenCLIPEmbedderWithCustomWords"
    assert sd.cond_stage_model.id_pad == 0 and sd.cond_stage_model.wrapped.layer == "penultimate"
    assert type(sd.cond_stage_model.wrapped.model.token_embedding).__name__ == "EmbeddingsWithFixes"
    assert model.family == SD2 and model.prediction_type == V_PREDICTION


def test_sd2_ti_and_hn_runs_leave_the_model_unchanged(model, dataset, tmp_path):
    before = snapshot(model.sd_model)
    ti = train(model, dataset, tmp_path, "textual-inversion", "sd2emb")
    assert ti.step == 2 and not ti.interrupted
    emb = read_embedding(ti.artifacts[0])
    assert set(emb.vectors) == {"clip_l"} and emb.vectors["clip_l"].shape == (2, 1024)
    assert bool(torch.isfinite(emb.vectors["clip_l"]).all())
    hn = train(model, dataset, tmp_path, "hypernetwork", "sd2hn")
    assert hn.step == 2 and hn.artifacts[0].is_file()
    state = torch.load(hn.artifacts[0], map_location="cpu", weights_only=False)
    assert 1024 in state and state[1024][0]
    assert same_weights(model.sd_model, before)


def test_sd2_medvram_ti_step_and_hooks_afterwards(webui, dataset, tmp_path):
    """SD2's hooks sit on the OpenCLIP model and its token embedding (parent: the raw embedder, `.wrapped`)."""
    from modules import lowvram
    from test_webui_placement import _hook_count

    from finetune_core.model.webui_backend import WebUIModel

    webui.cmd_opts.medvram = True
    import tiny_webui_sdxl

    sd = tiny_webui_sdxl.build_sd2()
    assert sd.lowvram and _hook_count(sd.cond_stage_model.wrapped) == 2
    hooks_before, before = _hook_count(sd), snapshot(sd)
    result = train(WebUIModel(sd), dataset, tmp_path, "textual-inversion", "sd2med")
    assert result.step == 2 and read_embedding(result.artifacts[0]).vectors["clip_l"].shape == (2, 1024)
    assert lowvram.module_in_gpu is None and _hook_count(sd) == hooks_before and same_weights(sd, before)
    calls = len(lowvram.hook_calls)
    with torch.no_grad():
        sd.get_learned_conditioning(["a cat"])
    assert lowvram.module_in_gpu is sd.cond_stage_model.wrapped and lowvram.location["text"] == "device"
    assert len(lowvram.hook_calls) > calls
