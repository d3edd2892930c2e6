"""Pause and prompt inside the WebUI stand-in (issue 23): a paused LoRA job draws with its adapters as they are
(through the WebUI's txt2img, as its previews do), leaves the loaded model unchanged, and resumes exactly."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from finetune_core.train.events import StepEvent
from tests.webui.webui_runs import request, same_weights, snapshot

PROMPT = "a red thing"


def _job(dataset, name: str):
    job = request(dataset, "lora", name, steps=4, method_settings={"rank": 4, "alpha": 4})
    job.train_settings.update(learning_rate="0.05", preview_every=2, preview_steps=3, preview_prompt=PROMPT, seed=4)
    return job


def _run(extension, dataset, name: str, pause_at: int | None):
    runner, host = extension.EXTENSION.runner, extension.EXTENSION.host
    original = type(host).on_event

    def on_event(event):
        original(host, event)
        if pause_at is not None and isinstance(event, StepEvent) and event.step == pause_at:
            runner.pause()
    host.on_event = on_event
    runner.start(_job(dataset, name))
    return runner


def test_a_paused_lora_job_draws_with_its_adapters_and_resumes_as_if_never_paused(webui, sd1, extension, dataset):
    before = snapshot(sd1)
    runner = _run(extension, dataset, "paused", pause_at=2)
    deadline = time.monotonic() + 300
    while runner.state().status != "paused" or runner.state().step < 2:
        assert time.monotonic() < deadline and runner.state().status in ("waiting", "running", "paused")
        time.sleep(0.05)
    picture = runner.generate_paused(PROMPT)
    state = runner.state()
    preview = Path(state.run_dir) / "images" / "paused-2.png"
    assert np.array_equal(np.asarray(Image.open(picture).convert("RGB")),
                          np.asarray(Image.open(preview).convert("RGB")))  # the adapters of step 2
    # the model switched in between: refused with a sentence, and nothing of the job reaches the other model
    import pytest
    import tiny_webui_model
    from modules import shared

    from finetune_core.errors import JobBusy
    other = tiny_webui_model.build_sd1()
    other_before = snapshot(other)
    with pytest.raises(JobBusy, match="model was switched"):
        runner.generate_paused(PROMPT)
    assert same_weights(other, other_before)
    shared.sd_model = sd1
    runner.resume()
    assert runner.wait(300) and runner.state().status == "finished", runner.state().error
    final_preview = Path(state.run_dir) / "images" / "paused-4.png"
    assert not np.array_equal(np.asarray(Image.open(picture)), np.asarray(Image.open(final_preview)))
    paused_file = next(p for p in runner.state().artifacts if p.suffix == ".safetensors")
    straight = _run(extension, dataset, "straight", pause_at=None)
    assert straight.wait(300) and straight.state().status == "finished", straight.state().error
    straight_file = next(p for p in straight.state().artifacts if p.suffix == ".safetensors")
    a, b = load_file(paused_file), load_file(straight_file)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert same_weights(sd1, before)  # the loaded model is as it was
