"""Pause and prompt (issue 23): while a job is paused, a picture with its state as it is; resume trains on exactly
as if it had never paused. Standalone host and job runner, tiny SD1 model, Textual Inversion."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from finetune_core.errors import JobBusy
from finetune_core.hosts.job_runner import JobRunner
from finetune_core.hosts.standalone import StandaloneHost
from finetune_core.jobs import service
from finetune_core.model.tiny import build_tiny
from finetune_core.train.events import StepEvent
from tests.conftest import EXAMPLES

PROMPT = "a picture of pauseword"


class PausingHost(StandaloneHost):
    """Presses Pause when step `at` ends (the loop then holds before the next step)."""

    def __init__(self, root: Path, at: int | None) -> None:
        super().__init__(root, "tiny-sd1", loader=build_tiny)
        self.at = at
        self.runner: Any = None

    def on_event(self, event: Any) -> None:
        super().on_event(event)
        if self.at is not None and isinstance(event, StepEvent) and event.step == self.at:
            self.runner.pause()


def _request(root: Path) -> service.TrainRequest:
    return service.TrainRequest(
        "textual-inversion", "pauseword", {"init_text": "ball"},
        {"data_dir": str(root / "data"), "template": str(root / "t.txt"), "width": 64, "height": 64},
        {"steps": 4, "learning_rate": "0.05", "save_every": 0, "preview_every": 2, "preview_steps": 4,
         "preview_prompt": PROMPT, "csv_every": 0, "seed": 2}, overwrite=True)


def _run(root: Path, pause_at: int | None) -> tuple[JobRunner, PausingHost]:
    root.mkdir(parents=True)
    (root / "t.txt").write_text("a picture of [name], [filewords]\n")
    shutil.copytree(EXAMPLES, root / "data")
    host = PausingHost(root / "out", pause_at)
    runner = host.runner = JobRunner(host)
    runner.start(_request(root))
    return runner, host


def _vector(path: Path) -> torch.Tensor:
    return torch.load(path, weights_only=False)["string_to_param"]["*"]


def test_a_paused_job_draws_with_its_current_state_and_resumes_as_if_never_paused(tmp_path):
    runner, _host = _run(tmp_path / "paused", pause_at=2)
    deadline = time.monotonic() + 300
    while runner.state().status != "paused" or runner.state().step < 2:
        assert time.monotonic() < deadline and runner.state().status in ("waiting", "running", "paused")
        time.sleep(0.05)
    path = runner.generate_paused(PROMPT)
    state = runner.state()
    assert state.step == 2 and state.status == "paused"
    # the loop's own preview of step 2 (same prompt, same preview seed): the same weights draw the same picture
    preview = Path(state.run_dir) / "images" / "pauseword-2.png"
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(Image.open(preview).convert("RGB")))
    other = runner.generate_paused(PROMPT, seed=11)
    assert not np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(other)))
    runner.resume()
    assert runner.wait(300) and runner.state().status == "finished"
    with pytest.raises(JobBusy, match="only while it is paused"):
        runner.generate_paused(PROMPT)
    straight, _ = _run(tmp_path / "straight", pause_at=None)
    assert straight.wait(300) and straight.state().status == "finished"
    paused_file = [p for p in runner.state().artifacts if p.suffix == ".pt"][0]
    straight_file = [p for p in straight.state().artifacts if p.suffix == ".pt"][0]
    assert torch.equal(_vector(paused_file), _vector(straight_file))
    # the picture was the state of step 2, not of the end
    final_preview = Path(state.run_dir) / "images" / "pauseword-4.png"
    assert not np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(final_preview)))
