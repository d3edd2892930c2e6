"""Runs one training job at a time in a background thread and keeps its progress readable by polling."""

from __future__ import annotations

import copy
import inspect
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from finetune_core.errors import FinetuneError, JobBusy
from finetune_core.hosts.console import format_seconds
from finetune_core.hosts.host import Host
from finetune_core.jobs import best_step, compare, service
from finetune_core.jobs.service import JobResult, Plan, TrainRequest
from finetune_core.methods import METHODS
from finetune_core.train.control import Control
from finetune_core.train.events import (
    ArtifactChecked,
    ArtifactSaved,
    Event,
    Failed,
    Finished,
    Phase,
    PreviewEvent,
    Started,
    StepEvent,
    ValidationEvent,
    Warning_,
)

log = logging.getLogger(__name__)

TrainFn = Callable[[Plan, Any, Callable[[Event], None], Control], JobResult]  # service.train_plan's shape
T = TypeVar("T")
ACTIVE = ("waiting", "running", "paused")


@dataclass
class JobState:
    """What the tab and the REST status show about the current (or last) job."""

    job_id: str = ""
    method: str = ""
    name: str = ""
    task_id: str = ""
    status: str = "idle"  # idle | waiting | running | paused | finished | interrupted | failed
    step: int = 0
    total: int = 0
    start_step: int = 0
    epoch: int = 0
    phase: str = ""  # work before step 1, e.g. "latents 3/10, ETA 4s"; empty once training runs
    phase_started: float | None = None  # when the current phase began (its ETA)
    losses: list[tuple[int, float]] = field(default_factory=list)
    learning_rates: list[tuple[int, float]] = field(default_factory=list)
    validation_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    eta_seconds: float | None = None
    seconds_per_step: float | None = None
    previews: list[tuple[Path, int, str]] = field(default_factory=list)  # (path, step, prompt)
    artifacts: list[Path] = field(default_factory=list)
    copies: list[Path] = field(default_factory=list)  # intermediate copies saved in the run folder so far
    messages: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # the host's loader on each saved file ("N of N modules applied")
    error: str = ""
    run_dir: Path | None = None
    started_at: float | None = None
    finished_at: float | None = None
    version: int = 0  # bumped on every change, so a poller can skip redrawing

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def as_dict(self, history: int = 500) -> dict[str, Any]:
        """JSON-friendly view (REST); loss/LR histories thinned to at most `history` points."""
        return {"job_id": self.job_id, "method": self.method, "name": self.name, "status": self.status,
                "active": self.active, "step": self.step, "total": self.total, "start_step": self.start_step,
                "epoch": self.epoch, "phase": self.phase, "eta_seconds": self.eta_seconds,
                "seconds_per_step": self.seconds_per_step,
                "losses": [list(p) for p in thin(self.losses, history)],
                "learning_rates": [list(p) for p in thin(self.learning_rates, history)],
                "validation_losses": [list(p) for p in thin(self.validation_losses, history)],
                "previews": [{"path": str(p), "step": s, "prompt": t} for p, s, t in self.previews],
                "artifacts": [str(p) for p in self.artifacts], "copies": [str(p) for p in self.copies],
                "messages": list(self.messages), "checks": list(self.checks),
                "error": self.error, "run_dir": None if self.run_dir is None else str(self.run_dir),
                "started_at": self.started_at, "finished_at": self.finished_at, "version": self.version}


def where_job_is(state: JobState) -> str:
    """'step 3/10', or what it does before its first step ('preparing latents 2/5', 'starting')."""
    if state.total:
        return f"step {state.step}/{state.total}"
    return f"preparing {state.phase}" if state.phase else "starting"


def thin(points: list[tuple[int, float]], limit: int) -> list[tuple[int, float]]:
    """Every k-th point so at most `limit` remain, always keeping the last one."""
    if limit <= 0 or len(points) <= limit:
        return list(points)
    stride = -(-len(points) // limit)
    kept = points[::stride]
    return kept if kept[-1] == points[-1] else kept + [points[-1]]


def _default_train(plan: Plan, model: Any, on_event: Callable[[Event], None], control: Control) -> JobResult:
    return service.train_plan(plan, model, on_event, control)


def _default_check(host: Host) -> Callable[[TrainRequest], Plan]:
    def check(request: TrainRequest) -> Plan:
        return service.plan(request, host.folders(), host.template_dirs(), host.model_family())

    return check


def _default_output_kind(method: str) -> str:
    return METHODS[method].output_kind


class JobRunner:
    """One job at a time: start / interrupt / pause / resume, and a polled JobState."""

    def __init__(self, host: Host, train_fn: TrainFn | None = None,
                 output_kind: Callable[[str], str] | None = None,
                 check: Callable[[TrainRequest], Plan] | None = None) -> None:
        self.host = host
        self._train_fn = train_fn or _default_train
        self._output_kind = output_kind or _default_output_kind
        # Validates a request without the model before it is accepted (FinetuneError: refused, nothing written).
        self._check = check or _default_check(host)
        self._lock = threading.Lock()
        self._state = JobState()
        self._control: Control | None = None
        self._thread: threading.Thread | None = None

    # --- commands -----------------------------------------------------------------------------------------
    def start(self, request: TrainRequest, task_id: str | None = None) -> str:
        """Check `request` (plan it, once), start the plan in the background and return its job id.

        JobBusy when a job is already running; the check's FinetuneError when the request cannot run.
        """
        with self._lock:
            self._refuse_if_busy("A training job is already running")
        plan = self._check(request)
        request = plan.request  # as it will run (a resume: the run's saved request)
        with self._lock:
            self._refuse_if_busy("A training job is already running")
            job_id = uuid.uuid4().hex[:12]
            self._control = Control()
            self._state = JobState(job_id=job_id, method=request.method, name=request.name, task_id=task_id or "",
                                   status="waiting", started_at=time.time(), version=self._state.version + 1)
            control = self._control
        self._thread = threading.Thread(target=self._run, args=(plan, control, job_id, task_id),
                                        name=f"finetune-job-{job_id}", daemon=True)
        self._thread.start()
        return job_id

    def run_with_model(self, work: Callable[[], T]) -> T:
        """Run `work`, which uses the model, serialised with jobs by the host's lock; JobBusy while a job runs.

        A running job has hooks on the shared model (spliced embeddings, attention transforms), so other work on
        the model is refused rather than made to wait for the whole job.
        """
        with self._lock:
            self._refuse_if_busy("The model is in use by a training job")
        return run_exclusive(self.host, work, None)

    def create(self, service: Any, method: str, name: str, settings: dict[str, Any], overwrite: Any) -> list[Path]:
        """Create an untrained artefact: checked without the model first, then made under the model lock."""
        folders = self.host.folders()
        service.validate_create(method, name, settings, folders, overwrite)
        paths = self.run_with_model(lambda: service.create(method, name, settings, self.host.get_model(), folders,
                                                           overwrite))
        self.host.artifacts_written(self._output_kind(method), list(paths))
        return list(paths)

    def compare(self, run_dir: str, prompts: list[str] | None = None, seeds: list[int] | None = None) -> Any:
        """The comparison grid of a run's saved copies (issue 23): checked without the model, then made under the
        model lock; refused (JobBusy) while a job trains or is paused, never interleaved with its steps."""
        compare.check_compare(run_dir, prompts, seeds)
        return self.run_with_model(lambda: compare.compare(run_dir, self.host.get_model(), prompts, seeds))

    def use_copy(self, run_dir: str, step: int | None = None) -> tuple[int, list[Path], list[Path]]:
        """Make a saved copy of a run the artefact (issue 23); refused for the run of the active job (its end would
        write the file again)."""
        info = best_step.run_info(run_dir)
        with self._lock:
            if self._state.active and self._state.run_dir is not None and \
                    Path(self._state.run_dir).resolve() == info.path.resolve():
                self._refuse_if_busy("This run is still training")
        chosen, written, backups = best_step.use_copy(run_dir, step)
        self.host.artifacts_written(self._output_kind(info.method), written)
        return chosen, written, backups

    def generate_paused(self, prompt: str, negative_prompt: str = "", seed: int = -1,
                        timeout: float | None = 600.0) -> Path:
        """A picture with the paused job's state as it is (issue 23): the loop makes it on its own thread at the
        preview's settings (seed -1: the preview seed) and saves it in the run's images; JobBusy unless paused."""
        with self._lock:
            control = self._control
            if self._state.status != "paused" or control is None:
                raise JobBusy("pictures with the state of a job can be made only while it is paused; press Pause "
                              "and try again")
        switched = getattr(self.host, "model_switched", None)
        if switched is not None and switched():
            raise JobBusy("the loaded model was switched while the job was paused, so its state no longer belongs to "
                          "the model: load the model the job trains on again, or interrupt the job")
        answer = control.ask_sample({"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed})
        path = Path(answer.result(timeout))
        with self._lock:
            self._state.messages.append(f"Made {path} with the state of step {self._state.step} (paused).")
            self._state.version += 1
        return path

    def _refuse_if_busy(self, what: str) -> None:
        """Under self._lock: JobBusy naming the running job."""
        if self._state.active:
            raise JobBusy(f"{what} ({self._state.method} '{self._state.name}', {where_job_is(self._state)}); wait "
                          f"for it to finish or press Interrupt, then try again.")

    def interrupt(self) -> bool:
        """Ask the running job to save and stop at the next step; False when nothing runs."""
        return self._command(lambda c: c.interrupt(), "interrupting")

    def pause(self) -> bool:
        """Hold the running job at the next step boundary, keeping everything in memory."""
        return self._command(lambda c: c.pause(), "paused")

    def resume(self) -> bool:
        """Continue a paused job."""
        return self._command(lambda c: c.resume(), "running")

    def _command(self, apply: Callable[[Control], None], status: str) -> bool:
        with self._lock:
            if not self._state.active or self._control is None:
                return False
            apply(self._control)
            if status == "interrupting":
                self._state.messages.append("Interrupt requested: the job saves and stops at the next step.")
            elif self._state.status != "waiting":
                self._state.status = status
            self._state.version += 1
            return True

    # --- reading ------------------------------------------------------------------------------------------
    def state(self) -> JobState:
        """A consistent copy of the current job's state."""
        with self._lock:
            return copy.deepcopy(self._state)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._state.active

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current job ends; True when it has."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.busy

    # --- the job ------------------------------------------------------------------------------------------
    def _run(self, plan: Plan, control: Control, job_id: str, task_id: str | None) -> None:
        try:
            result = run_exclusive(self.host, lambda: self._train(plan, control), task_id)
            self._finish(result)
        except FinetuneError as exc:
            self._fail(str(exc))
        except Exception as exc:  # a bug: keep the server alive, show it, log the traceback
            log.exception("training job %s failed with an unexpected error", job_id)
            self._fail(f"Internal error ({type(exc).__name__}: {exc}); the console log has the details.")

    def _train(self, plan: Plan, control: Control) -> JobResult:
        with self._lock:
            self._state.status = "paused" if control.paused else "running"
            self._state.version += 1
        model = self.host.get_model()
        result = self._train_fn(plan, model, self._on_event, control)
        if result.artifacts:
            self.host.artifacts_written(self._output_kind(plan.request.method), list(result.artifacts))
        return result

    def _finish(self, result: JobResult) -> None:
        with self._lock:
            state = self._state
            state.status = "interrupted" if result.interrupted else "finished"
            state.step = max(state.step, result.step)
            state.artifacts = _unique(state.artifacts + list(result.artifacts))
            state.run_dir = result.run_dir or state.run_dir
            if result.message:
                state.messages.append(result.message)
            state.finished_at = time.time()
            state.version += 1

    def _fail(self, message: str) -> None:
        with self._lock:
            self._state.status = "failed"
            self._state.error = message
            self._state.finished_at = time.time()
            self._state.version += 1

    def _on_event(self, event: Event) -> None:
        with self._lock:
            record_event(self._state, event)
            self._state.version += 1
        self.host.on_event(event)


def record_event(state: JobState, event: Event) -> None:
    """Fold one loop event into the job state."""
    if isinstance(event, Started):
        state.run_dir, state.total, state.start_step, state.step = (event.run_dir, event.total_steps,
                                                                    event.start_step, event.start_step)
    elif isinstance(event, Phase):
        now = time.time()
        if event.done == 0 or state.phase_started is None or not state.phase.startswith(f"{event.what} "):
            state.phase_started = now
        state.phase = f"{event.what} {event.done}/{event.total}"
        if 0 < event.done < event.total:
            left = (now - state.phase_started) / event.done * (event.total - event.done)
            state.phase += f", ETA {format_seconds(left)}"
    elif isinstance(event, StepEvent):
        state.phase = ""
        state.step, state.total, state.epoch = event.step, event.total_steps, event.epoch
        state.losses.append((event.step, float(event.loss)))
        state.learning_rates.append((event.step, float(event.learning_rate)))
        state.eta_seconds, state.seconds_per_step = event.eta_seconds, event.seconds_per_step
    elif isinstance(event, ValidationEvent):
        state.validation_losses.append((event.step, float(event.loss)))
    elif isinstance(event, PreviewEvent):
        state.previews.append((Path(event.path), event.step, event.prompt))
    elif isinstance(event, ArtifactSaved):
        if event.final:
            state.artifacts = _unique(state.artifacts + [Path(p) for p in event.paths])
        else:
            state.copies = _unique(state.copies + [Path(p) for p in event.paths])
    elif isinstance(event, ArtifactChecked):
        state.checks.append(event.line)
    elif isinstance(event, Warning_):
        state.messages.append(event.message)
    elif isinstance(event, Finished):
        state.step = event.step
        state.artifacts = _unique(state.artifacts + [Path(p) for p in event.artifacts])
        state.run_dir = event.run_dir
    elif isinstance(event, Failed):
        state.error = event.message


def _unique(paths: list[Path]) -> list[Path]:
    return list(dict.fromkeys(Path(p) for p in paths))


def run_exclusive(host: Host, job: Callable[[], T], task_id: str | None) -> T:
    """host.run_exclusive(job), passing the WebUI task id when the host's run_exclusive takes `task_id`."""
    if task_id and "task_id" in inspect.signature(host.run_exclusive).parameters:
        return host.run_exclusive(job, task_id=task_id)  # type: ignore[call-arg]
    return host.run_exclusive(job)
