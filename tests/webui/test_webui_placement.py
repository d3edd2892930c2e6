"""--medvram / --lowvram: the autograd step runs with the lowvram hooks off and exactly the modules it needs
resident; afterwards the hooks swap modules for generation as before. With FINETUNE_WEBUI_CUDA=1 on a GPU the
"device" is real, so any misplaced tensor raises "Expected all tensors to be on the same device"."""

from __future__ import annotations

import pytest
import torch
from test_webui_training import run, ti_request, weights_checksum
from webui_runs import spy_on_steps

from finetune_core.model.placement import LOWVRAM_HOOK_NAME
from finetune_core.model.webui_backend import WebUIModel


@pytest.fixture(params=["medvram", "lowvram"])
def vram_sd1(request, webui):
    setattr(webui.cmd_opts, request.param, True)
    import tiny_webui_model

    model = tiny_webui_model.build_sd1()
    assert model.lowvram
    return request.param, model


def _hook_count(module):
    return sum(1 for m in module.modules() for h in m._forward_pre_hooks.values()
               if getattr(h, "__name__", "") == LOWVRAM_HOOK_NAME)


def test_training_step_fires_no_hook_and_hooks_work_afterwards(extension, vram_sd1, dataset, monkeypatch):
    from modules import lowvram

    mode, sd1 = vram_sd1
    hooks_before, checksum = _hook_count(sd1), weights_checksum(sd1)
    fired_inside, resident = spy_on_steps(monkeypatch)
    state, _ = run(extension, ti_request(dataset, steps=2))
    assert state.status == "finished", (state.error, state.messages)
    assert len(fired_inside) >= 2 and all(calls == [] for calls in fired_inside), fired_inside
    assert resident and all(r["unet"] == "device" and r["text"] == "device" and r["vae"] == "cpu"
                            for r in resident), resident
    # Afterwards: nothing left resident, hooks re-armed, and generation moves modules as before.
    assert lowvram.module_in_gpu is None and _hook_count(sd1) == hooks_before
    assert weights_checksum(sd1) == checksum
    calls = len(lowvram.hook_calls)
    with torch.no_grad():
        cond = sd1.get_learned_conditioning(["a cat"])
        assert lowvram.module_in_gpu is sd1.cond_stage_model.wrapped and lowvram.location["text"] == "device"
        x = torch.randn(1, 4, 8, 8, device=cond.device)
        sd1.apply_model(x, torch.tensor([10], device=cond.device), cond)
        if mode == "medvram":
            assert lowvram.module_in_gpu is sd1.model and lowvram.location["text"] == "cpu"
        sd1.decode_first_stage(x)
    assert len(lowvram.hook_calls) > calls and lowvram.location["vae"] == "device"


def test_backend_outside_a_step_uses_the_hooks(vram_sd1):
    from modules import lowvram

    _, sd1 = vram_sd1
    model = WebUIModel(sd1)
    with torch.no_grad():
        cond = model.encode_prompts(["a cat"])
        calls = len(lowvram.hook_calls)
        out = model.predict(torch.randn(1, 4, 8, 8), torch.tensor([5]), cond)
    assert out.shape == (1, 4, 8, 8) and len(lowvram.hook_calls) > calls
    with model.placement():
        calls = len(lowvram.hook_calls)
        moments = model.encode_images(torch.rand(1, 3, 64, 64) * 2 - 1)
        model.decode_latents(moments.mean)
        assert len(lowvram.hook_calls) == calls and lowvram.location["vae"] == "cpu"  # moved in and out again
    assert moments.mean.shape == (1, 4, 8, 8)
