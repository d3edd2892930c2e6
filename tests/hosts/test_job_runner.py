from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from finetune_core.errors import ConfigError
from finetune_core.hosts.job_runner import JobBusy, JobRunner, thin
from finetune_core.jobs.service import JobResult, TrainRequest
from finetune_core.train.events import ArtifactSaved, PreviewEvent, Started, StepEvent, Warning_
from tests.ui.conftest import planned


class ScriptedTrain:
    """A fake service.train_plan: emits steps, optionally waits on a gate, honours interrupt and pause."""

    def __init__(self, steps: int = 3, gate: threading.Event | None = None, error: Exception | None = None):
        self.steps, self.gate, self.error = steps, gate, error
        self.calls: list[dict[str, Any]] = []

    def __call__(self, plan, model, on_event, control) -> JobResult:
        self.calls.append({"plan": plan, "model": model})
        if self.error is not None:
            raise self.error
        on_event(Started(Path("run"), self.steps, 0))
        step = 0
        for step in range(1, self.steps + 1):
            if self.gate is not None:
                self.gate.wait(5)
            control.wait_while_paused(5)
            if control.interrupted:
                return JobResult([], Path("run"), step - 1, True, "interrupted")
            on_event(StepEvent(step, self.steps, 1.0 / step, 0.01, 0, 0.1, 0.1 * (self.steps - step)))
        on_event(PreviewEvent(step, Path("run/p.png"), None, "a prompt"))
        on_event(Warning_("careful"))
        on_event(ArtifactSaved(step, (Path("out/e.pt"),), True))
        return JobResult([Path("out/e.pt")], Path("run"), step, False, "done")


def _runner(host: Any, train: ScriptedTrain) -> JobRunner:
    return JobRunner(host, train_fn=train, output_kind=lambda method: "embeddings", check=planned)


def test_a_job_runs_to_the_end_and_records_events(host: Any) -> None:
    train = ScriptedTrain(steps=3)
    runner = _runner(host, train)
    job_id = runner.start(TrainRequest(method="m", name="n"))
    assert runner.wait(5)
    state = runner.state()
    assert state.job_id == job_id and state.status == "finished"
    assert (state.step, state.total) == (3, 3)
    assert [s for s, _ in state.losses] == [1, 2, 3] and state.losses[-1][1] == pytest.approx(1 / 3)
    assert state.previews[0][1] == 3 and state.artifacts == [Path("out/e.pt")]
    assert "careful" in state.messages and state.eta_seconds == pytest.approx(0.0)
    assert train.calls[0]["model"] is host.model
    assert host.written == [("embeddings", [Path("out/e.pt")])]
    assert len(host.events) == 7  # every event is forwarded to the host too


def test_a_second_job_is_refused_while_one_runs(host: Any) -> None:
    gate = threading.Event()
    runner = _runner(host, ScriptedTrain(steps=2, gate=gate))
    runner.start(TrainRequest(method="m", name="first"))
    with pytest.raises(JobBusy, match="already running"):
        runner.start(TrainRequest(method="m", name="second"))
    gate.set()
    assert runner.wait(5)
    runner.start(TrainRequest(method="m", name="third"))  # allowed once the first has ended
    assert runner.wait(5) and runner.state().name == "third"


def test_interrupt_and_pause_reach_the_loop(host: Any) -> None:
    gate = threading.Event()
    runner = _runner(host, ScriptedTrain(steps=50, gate=gate))
    assert not runner.interrupt()  # nothing runs yet
    runner.start(TrainRequest(method="m", name="n"))
    assert runner.pause() and runner.state().status in ("paused", "waiting")
    assert runner.resume()
    assert runner.interrupt()
    gate.set()
    assert runner.wait(5)
    state = runner.state()
    assert state.status == "interrupted" and state.step < 50


def test_finetune_errors_are_shown_and_bugs_do_not_escape(host: Any, caplog) -> None:
    runner = _runner(host, ScriptedTrain(error=ConfigError("steps must be more than 0")))
    runner.start(TrainRequest(method="m", name="n"))
    assert runner.wait(5)
    assert runner.state().status == "failed" and runner.state().error == "steps must be more than 0"
    runner = _runner(host, ScriptedTrain(error=KeyError("boom")))
    runner.start(TrainRequest(method="m", name="n"))
    assert runner.wait(5)
    state = runner.state()
    assert state.status == "failed" and "Internal error" in state.error and "KeyError" in state.error
    assert any("failed with an unexpected error" in r.message for r in caplog.records)


def test_task_id_reaches_a_host_that_accepts_it(host: Any) -> None:
    seen: list[str] = []

    class WebuiLike(type(host)):  # type: ignore[misc]
        def run_exclusive(self, job, task_id=None):  # type: ignore[override]
            seen.append(task_id)
            return job()

    other = WebuiLike(host.root)
    runner = _runner(other, ScriptedTrain(steps=1))
    runner.start(TrainRequest(method="m", name="n"), task_id="task(abc)")
    assert runner.wait(5) and seen == ["task(abc)"]
    runner = _runner(host, ScriptedTrain(steps=1))  # a host without the keyword still works
    runner.start(TrainRequest(method="m", name="n"), task_id="task(abc)")
    assert runner.wait(5) and runner.state().status == "finished"


def test_thin_keeps_the_last_point() -> None:
    points = [(i, float(i)) for i in range(1, 1001)]
    kept = thin(points, 100)
    assert len(kept) <= 101 and kept[-1] == (1000, 1000.0) and kept[0] == (1, 1.0)
    assert thin(points[:5], 100) == points[:5]


def test_the_host_loaders_check_lines_and_warnings_reach_the_rest_status():
    from pathlib import Path

    from finetune_core.hosts.job_runner import JobState, record_event
    from finetune_core.train.events import ArtifactChecked

    state = JobState()
    record_event(state, ArtifactChecked(4, Path("style.safetensors"), "the WebUI's Lora extension", 288, 289,
                                        ("lora_unet_gone",)))
    record_event(state, Warning_("style.safetensors: 1 of 289 modules not applied (keys lora_unet_gone)"))
    status = state.as_dict()
    assert status["checks"] == ["style.safetensors: 288 of 289 modules applied by the WebUI's Lora extension"]
    assert "lora_unet_gone" in status["messages"][0]


def test_the_app_stopping_saves_the_running_job_and_names_its_run_folder(host: Any, capsys) -> None:
    """What the `ui` app does when uvicorn returns on Ctrl-C or SIGTERM (issue 25.6)."""
    import time

    from finetune_core.ui.app import stop_running_job

    gate = threading.Event()
    runner = _runner(host, ScriptedTrain(steps=10**7, gate=gate))
    runner.start(TrainRequest(method="fake", name="x"))
    gate.set()
    while runner.state().step < 2:
        time.sleep(0.01)
    assert stop_running_job(runner, timeout=10) == 0
    assert runner.state().status == "interrupted" and "resume with --resume run" in capsys.readouterr().err
