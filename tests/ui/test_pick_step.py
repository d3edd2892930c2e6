"""The tab's side of picking a step (issue 23): the section's elements, its handlers, the validation curve."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pytest

from finetune_core.errors import ConfigError
from finetune_core.hosts.job_runner import JobRunner, JobState, record_event
from finetune_core.train.events import ValidationEvent
from finetune_core.ui.panels import loss_svg
from finetune_core.ui.pick_step import PickStep
from finetune_core.ui.tab import build_tab


def test_every_method_tab_has_the_pick_a_step_section(host: Any) -> None:
    from finetune_core.methods import METHODS
    blocks = build_tab(host, gr)
    ids = {getattr(block, "elem_id", None) for block in blocks.blocks.values()}
    for key in METHODS:
        slug = key.replace("-", "_")
        assert {f"finetune_{slug}_pick_compare", f"finetune_{slug}_pick_use", f"finetune_{slug}_pick_grid"} <= ids


def test_the_plot_draws_the_validation_loss_beside_the_training_loss() -> None:
    state = JobState()
    for step, loss in ((2, 0.9), (4, 0.7), (6, 0.8)):
        record_event(state, ValidationEvent(step, loss, min(loss, 0.7), 4))
    assert state.validation_losses == [(2, 0.9), (4, 0.7), (6, 0.8)]
    svg = loss_svg([(s, 1.0 - s / 10) for s in range(1, 7)], [], validation=state.validation_losses)
    assert svg.count("finetune-validation-point") == 3 and "finetune-validation-line" in svg
    assert "validation 0.8" in svg
    assert "finetune-validation" not in loss_svg([(1, 1.0)], [])


class _Runner:
    def __init__(self, state: JobState) -> None:
        self._state, self.calls = state, []

    def state(self) -> JobState:
        return self._state

    def compare(self, run: str, prompts: Any, seeds: Any) -> Any:
        self.calls.append((run, prompts, seeds))
        return SimpleNamespace(path=Path(run) / "images" / "compare-1.png", suggested=4)


def test_the_handlers_default_to_the_tab_s_last_run_and_parse_prompts_and_seeds() -> None:
    runner = _Runner(JobState(method="lora", run_dir=Path("/runs/a"), status="finished"))
    pick = PickStep(runner, "lora")  # type: ignore[arg-type]
    path, message = pick.compare("", "a ball\n\n on grass \n", "1, 2 3")
    assert runner.calls == [("/runs/a", ["a ball", "on grass"], [1, 2, 3])]
    assert path.endswith("compare-1.png") and "Suggested step: 4" in message
    pick.compare(" /runs/b ", "", "")
    assert runner.calls[-1] == ("/runs/b", None, None)
    with pytest.raises(ConfigError, match="whole numbers"):
        pick.compare("", "", "one")
    with pytest.raises(ConfigError, match="no run folder"):
        PickStep(runner, "hypernetwork").compare("", "", "")  # type: ignore[arg-type]


def test_the_grid_is_refused_with_a_sentence_while_a_job_is_paused(tmp_path: Path) -> None:
    runner = JobRunner(SimpleNamespace(folders=lambda: None))  # type: ignore[arg-type]
    runner._state = JobState(method="lora", name="x", status="paused", step=3, total=9)
    run = tmp_path / "run"
    (run / "artifacts").mkdir(parents=True)
    (run / "settings.json").write_text(json.dumps({"method": "lora", "output": {"name": "x", "dir": str(tmp_path)}}))
    (run / "request.json").write_text('{"method": "lora", "name": "x"}')
    (run / "artifacts" / "x-2.safetensors").write_bytes(b"")
    from finetune_core.errors import JobBusy
    with pytest.raises(JobBusy, match="in use by a training job"):
        runner.compare(str(run))
