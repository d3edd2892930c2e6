"""What the tab's buttons do, as plain functions of form values (testable without Gradio)."""

from __future__ import annotations

import html
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_core.errors import ConfigError, FinetuneError
from finetune_core.hosts.host import Host
from finetune_core.hosts.job_runner import JobRunner, JobState
from finetune_core.jobs import fit
from finetune_core.jobs.service import TrainRequest
from finetune_core.train.memory import free_device_memory
from finetune_core.ui import presets
from finetune_core.ui.dataset_view import lint_html, steps_arithmetic
from finetune_core.ui.panels import gallery_items, loss_svg, progress_html, result_html
from finetune_core.ui.schema import FieldSpec, coerce_all

log = logging.getLogger(__name__)
SECTIONS = ("method", "data", "train")
Values = dict[str, dict[str, Any]]  # section -> field -> value


def message_html(text: str, kind: str = "info") -> str:
    """A one-line message box (info / error) for the status area."""
    return f"<div class='finetune-message finetune-{kind}'>{html.escape(text)}</div>"


@dataclass
class StatusView:
    """Everything the status panel shows, rendered."""

    progress: str
    plot: str
    gallery: list[tuple[Path, str]]
    result: str


@dataclass
class MethodActions:
    """The actions of one method's sub-tab."""

    host: Host
    runner: JobRunner
    service: Any  # finetune_core.jobs.service, or a stand-in with the same functions
    method: str
    output_kind: str
    sections: dict[str, list[FieldSpec]]  # "method" / "data" / "train" -> fields

    def typed(self, values: Values) -> Values:
        """Form values coerced to their field types; one ConfigError for every bad field."""
        problems: list[str] = []
        out: Values = {}
        for section in SECTIONS:
            try:
                out[section] = coerce_all(self.sections.get(section, []), values.get(section, {}))
            except ConfigError as exc:
                problems.extend(exc.problems)
        if problems:
            raise ConfigError(problems)
        return out

    def request(self, name: str, values: Values, overwrite: bool = False, resume_run: str = "") -> TrainRequest:
        """The TrainRequest the form describes."""
        if resume_run.strip():  # the run's own name and settings (the form is for new runs)
            return TrainRequest(method=self.method, name="", overwrite=overwrite, resume_run=resume_run.strip())
        typed = self.typed(values)
        if not name.strip():
            raise ConfigError("the name is empty; type the name the new file should have")
        return TrainRequest(method=self.method, name=name.strip(), method_settings=typed["method"],
                            data_settings=typed["data"], train_settings=typed["train"], overwrite=overwrite,
                            resume_run=resume_run.strip() or None)

    def train(self, name: str, values: Values, overwrite: bool, resume_run: str, task_id: str | None) -> str:
        """Start a job; returns the message for the status line (JobBusy / ConfigError propagate)."""
        job_id = self.runner.start(self.request(name, values, overwrite, resume_run), task_id=task_id)
        return message_html(f"Training '{name.strip() or resume_run}' started (job {job_id}).")

    def lint(self, values: Values) -> tuple[str, str]:
        """(lint table HTML, steps arithmetic) for the dataset the form points at."""
        typed = self.typed(values)
        data, train = typed["data"], typed["train"]
        report = self.service.lint(data, self.method, self._model_or_none())
        arithmetic = steps_arithmetic(len(report.rows), int(data.get("repeats", 1)), int(data.get("batch_size", 1)),
                                      int(train.get("gradient_accumulation", 1)), int(train.get("steps", 0)))
        return lint_html(report, str(data.get("crop", "center"))), arithmetic

    def _model_or_none(self) -> Any:
        try:
            return self.host.get_model()
        except FinetuneError as exc:  # token counts need a model; the rest of the lint does not
            log.info("lint without token counts: %s", exc)
            return None

    def estimate(self, values: Values, size: str = "") -> tuple[str, Values]:
        """The measured peak memory of the form's settings on the loaded model's architecture and, for `size` (like
        8GB; empty: the CUDA device's free memory), the plan that fits; (sentence, the plan's settings to apply)."""

        if not fit.can_measure():
            return ("Measuring memory builds the model's architecture with diffusers, which this install lacks (the "
                    "WebUI has none): run `python -m finetune_core estimate` in the standalone install.", {})
        typed = self.typed(values)
        model = self.host.get_model()
        target = fit.parse_size(size) - fit.CARD_RESERVE if size.strip() else free_device_memory(model.device)
        request = fit.request_for(self.method, model, typed)
        measured = fit.measure(request)
        text = f"Measured without a GPU on {request.model} in {request.weights}: {measured.describe()}."
        if target is None:
            return f"{text} Give a card size (like 8GB) for a plan that fits it.", {}
        plan = fit.plan_fit(request, target, measured)
        return f"{text} {plan.describe()}", plan.settings()

    def create(self, name: str, settings: dict[str, Any], create_specs: list[FieldSpec], overwrite: bool) -> str:
        """Create an empty artefact; returns a message naming the files."""
        if not name.strip():
            raise ConfigError("the name is empty; type the name the new file should have")
        typed = coerce_all(create_specs, settings)
        paths = self.runner.create(self.service, self.method, name.strip(), typed, overwrite)
        return "Created " + ", ".join(str(p) for p in paths)

    def status(self, state: JobState | None = None) -> StatusView:
        """The status panel for the current job."""
        state = state or self.runner.state()
        mine = state.method == self.method
        return StatusView(progress_html(state, self.method),
                          loss_svg(state.losses, state.learning_rates, validation=state.validation_losses)
                          if mine else loss_svg([], []),
                          gallery_items(state, self.method),
                          result_html(state) if mine else result_html(JobState()))

    # --- presets ------------------------------------------------------------------------------------------
    def _presets_dir(self) -> Path:
        return presets.presets_dir(self.host.folders().logs)

    def list_presets(self) -> list[str]:
        return presets.list_presets(self._presets_dir(), self.method)

    def save_preset(self, preset: str, name: str, values: Values) -> str:
        path = presets.save_preset(self._presets_dir(), self.method, preset, {"name": name, **self.typed(values)})
        return f"Saved preset '{preset}' to {path}"

    def load_preset(self, preset: str) -> tuple[str, Values]:
        settings = presets.load_preset(self._presets_dir(), self.method, preset)
        return str(settings.get("name", "")), {s: dict(settings.get(s, {})) for s in SECTIONS}


def guarded(gr: Any, fn: Callable[..., tuple], n_outputs: int, message_at: int) -> Callable[..., tuple]:
    """Wrap a handler: a FinetuneError becomes its message in output `message_at`; a bug is logged and shown."""

    def handler(*args: Any) -> tuple:
        try:
            return fn(*args)
        except FinetuneError as exc:
            text = message_html(str(exc), "error")
        except Exception as exc:  # a bug: keep the UI alive, say so, keep the traceback in the log
            log.exception("finetune tab handler %s failed", getattr(fn, "__name__", fn))
            text = message_html(f"Internal error ({type(exc).__name__}: {exc}); the console log has the details.",
                                "error")
        out = [gr.update() for _ in range(n_outputs)]
        out[message_at] = text
        return tuple(out)

    return handler
