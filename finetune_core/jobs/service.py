"""The job API every host calls: create, train, lint, inspect. Hosts (CLI, Gradio tab, REST, WebUI) are thin on top.

A host supplies the loaded model and the folders; this module builds the dataset, the method and the loop from plain
settings dicts (what a form, a JSON body or argparse produces), so every host validates and fails the same way.
Requests are checked without a model first (`plan`, `validate_create`; see `finetune_core.jobs.request`), so a host
can refuse a bad one before it loads anything or accepts a job; it then hands the checked Plan to `train_plan`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from finetune_core.cpu import autocast_problem
from finetune_core.data.dataset_config import DatasetConfig
from finetune_core.data.lint import lint_dataset, small_image_warnings
from finetune_core.data.scan import caption_warnings, image_files
from finetune_core.errors import ConfigError, ModelMismatchError
from finetune_core.formats.inspect import inspect_file
from finetune_core.formats.names import refuse_same_name, sanitize_name
from finetune_core.jobs import fit, preflight
from finetune_core.jobs.preflight import check_writable, storage_error
from finetune_core.jobs.request import (
    OutputFolders,
    Plan,
    TrainRequest,
    build_config,
    form_defaults,
    method_spec,
    plan_request,
    request_from_json,
)
from finetune_core.methods import MethodSpec
from finetune_core.model.loading import family_before_loading, load_model
from finetune_core.settings import coerce_value
from finetune_core.train import memory
from finetune_core.train.distributed import Processes
from finetune_core.train.events import Warning_, ignore_events
from finetune_core.train.loop import OutputSpec, resume_training, run_training
from finetune_core.train.lr_schedule import Schedule
from finetune_core.train.randomness import resolve_seed
from finetune_core.train.run_folder import RunFolder
from finetune_core.train.train_config import TrainConfig, config_from_dict

__all__ = ["JobResult", "OutputFolders", "Plan", "TrainRequest", "build_config", "create", "form_defaults", "inspect",
           "lint", "load", "method_spec", "plan", "request_from_json", "train", "train_plan", "validate_create",
           "validate_request"]

if TYPE_CHECKING:
    from finetune_core.data.data_batch import TrainingData
    from finetune_core.data.lint import LintReport
    from finetune_core.formats.kinds import ArtifactInfo
    from finetune_core.model.interface import DiffusionModel
    from finetune_core.train.control import Control
    from finetune_core.train.events import EventSink
    from finetune_core.train.method import Method


@dataclass
class JobResult:
    """What a finished (or interrupted) job produced."""

    artifacts: list[Path]
    run_dir: Path | None
    step: int
    interrupted: bool
    message: str


def load(spec: str, device: str | None = None) -> DiffusionModel:
    """Load a model for standalone use: a built-in tiny name, a single-file checkpoint or a diffusers folder."""
    import torch

    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(spec, device=chosen)


def plan(request: TrainRequest, folders: OutputFolders, template_dirs: Sequence[Path] = (),
         family: str | None = None) -> Plan:
    """Check a training request without a model (`family`: the family of the one it will train on, where known);
    the Plan says what will run (a resume: the run's saved request) and is what `train_plan` runs."""
    return plan_request(request, folders, template_dirs, family)


def model_family(spec: str) -> str | None:
    """The family of the model `spec` names, where it shows before loading (see `family_before_loading`)."""
    return family_before_loading(spec)


def validate_request(request: TrainRequest, folders: OutputFolders, template_dirs: Sequence[Path] = ()) -> TrainRequest:
    """Check a training request without a model; returns it as it will run (a resume: the run's saved request)."""
    return plan_request(request, folders, template_dirs).request


def validate_create(method: str, name: str, settings: Mapping[str, Any], folders: OutputFolders,
                    overwrite: bool = False) -> tuple[MethodSpec, str, Any, Path]:
    """Check a create request without a model: (the method, clean name, config, folder), or the sentence saying
    what is wrong."""
    spec = method_spec(coerce_value(method, "str", False, "method"))
    if spec.create_type is None:
        raise ConfigError(f"{spec.label} has no separate create step; train it directly")
    clean = sanitize_name(coerce_value(name, "str", False, "name"))
    config = build_config(spec.create_type, form_defaults(method)["method"], settings, spec.label)
    folder = folders.for_kind(spec.output_kind)
    overwrite = coerce_value(overwrite, "bool", False, "overwrite")
    if not overwrite:
        refuse_same_name(folder, clean, spec.output_kind)
    spec.check_request(config, clean, folder, overwrite)
    check_writable(folder, "output folder")
    return spec, clean, config, folder


def create(method: str, name: str, settings: Mapping[str, Any], model: DiffusionModel, folders: OutputFolders,
           overwrite: bool = False) -> list[Path]:
    """Create a new, untrained artefact file (the WebUI's Create embedding / Create hypernetwork)."""
    spec, clean, config, folder = validate_create(method, name, settings, folders, overwrite)
    try:
        return spec.create(model, clean, config, folder, overwrite)
    except OSError as exc:
        raise storage_error(exc, None) from exc


def lint(data_settings: Mapping[str, Any], method: str = "textual-inversion",
         model: DiffusionModel | None = None) -> LintReport:
    """Check a dataset before training: images, unreadable files, captions, sizes, token lengths, buckets."""
    config = build_config(DatasetConfig, form_defaults(method)["data"], data_settings, "dataset")
    return lint_dataset(config, token_counter=model.count_tokens if model is not None else None)


def inspect(path: str | Path) -> ArtifactInfo:
    """Say what an artefact file is (embedding, hypernetwork, checkpoint, aesthetic embedding, LoRA)."""
    return inspect_file(path)


def train(request: TrainRequest, model: DiffusionModel, folders: OutputFolders, on_event: EventSink | None = None,
          control: Control | None = None, template_dirs: Sequence[Path] = (),
          processes: Processes | None = None) -> JobResult:
    """Plan a request and run it (`train_plan`): settings are validated before any work."""
    return train_plan(plan_request(request, folders, template_dirs, model.family), model, on_event, control,
                      processes)


def train_plan(plan: Plan, model: DiffusionModel, on_event: EventSink | None = None, control: Control | None = None,
               processes: Processes | None = None) -> JobResult:
    """Run one planned job to the end (or to an interrupt) and say what it wrote.

    An existing artefact is never replaced unless `overwrite` is set (continuing an embedding or hypernetwork in
    place counts as asked). `processes`: the processes of a data-parallel run (the standalone CLI under
    `accelerate launch`); by default this one process.
    """
    processes = processes or Processes()
    emit = on_event if on_event is not None and processes.is_main else ignore_events
    if plan.run_dir is not None:
        _require_same_family(plan.run_dir, model)
    job = _prepare_job(plan, model, processes)
    for note in plan.notes:
        emit(Warning_(note, note=True))
    for message in job.warnings:
        emit(Warning_(message))
    return _run(plan, job, model, emit, control, processes)


@dataclass
class _Job:
    method: Method
    data: TrainingData
    train_config: TrainConfig
    warnings: list[str]
    validation: Any = None  # the validation set, when the validation loss is on


def _prepare_job(plan: Plan, model: DiffusionModel, processes: Processes) -> _Job:
    """Build the dataset and the method (reading the file to continue from), then check memory and disk space."""
    configs = plan.configs
    data = plan.spec.data(configs.method, configs.data, plan.name)
    seed = processes.share(resolve_seed(configs.train.seed))  # -1 draws once, in the main process
    train_config = configs.train
    slow = autocast_problem(model.device, train_config.precision)
    if slow:
        raise ConfigError(slow)
    if train_config.preview_every and train_config.preview_sampler not in model.sampler_names():
        raise ConfigError(f"the preview sampler {train_config.preview_sampler!r} is not available here; choose one "
                          f"of {', '.join(model.sampler_names())}")
    method = plan.spec.build(model, plan.name, configs.method, plan.final_dir, seed)
    warnings = list(method.check(model)) + _unusual_rate(plan.spec, plan.schedule)
    warnings += caption_warnings(getattr(data, "records", []))
    warnings += small_image_warnings(getattr(data, "records", []), configs.data)
    needs = plan.spec.memory(model, configs.method)
    final_bytes, run_bytes = preflight.disk_needs(needs, train_config.save_every > 0,
                                                  method.state_policy.resume_state)
    folders = [(plan.final_dir, "output folder", final_bytes), (plan.run_dir or plan.logs, "run folder", run_bytes)]
    preflight.check_disks(folders)
    _check_memory(plan, model, processes)
    validation = _validation_data(plan) if train_config.validation_every else None
    return _Job(method, data, dataclasses.replace(configs.train, seed=seed), warnings, validation)


def _validation_data(plan: Plan) -> Any:
    """The validation set through the method's own data builder: the validation folder, the held-out images, or the
    training images; one pass over each image (no repeats), batches no larger than the set."""
    data = plan.configs.data
    if data.validation_dir.strip():
        count = len(image_files(Path(data.validation_dir), data.recursive)[0])
        config = dataclasses.replace(data, data_dir=data.validation_dir, validation_dir="")
    elif data.validation_split:
        count, config = data.validation_split, dataclasses.replace(data, held_out=True)
    else:
        count, config = data.batch_size, data
    config = dataclasses.replace(config, repeats=1, batch_size=min(data.batch_size, count))
    return plan.spec.data(plan.configs.method, config, plan.name)


def _check_memory(plan: Plan, model: DiffusionModel, processes: Processes) -> None:
    """Refuse a run that will not fit the CUDA device's free memory, with the plan that fits (measured,
    `finetune_core.jobs.fit`); other devices, and hosts without diffusers (the WebUI), are not measured."""
    free = memory.free_device_memory(model.device)  # through the module: tests give it a device
    if free is None or not fit.can_measure():
        return
    # the file to continue from changes no shape; the measurement starts the artefact afresh
    configs = {"method": plan.configs.method, "data": plan.configs.data, "train": plan.configs.train}
    settings = {key: {k: v for k, v in dataclasses.asdict(config).items() if k != "continue_from"}
                for key, config in configs.items()}
    fit.check_fits(fit.request_for(plan.request.method, model, settings, processes.world), model.device, free)


def _unusual_rate(spec: MethodSpec, schedule: Schedule) -> list[str]:
    """A warning when the schedule's highest rate is far above what the method is usually trained with."""
    if not spec.usual_max_lr:
        return []
    highest = max(rate for rate, _ in schedule)
    if highest <= spec.usual_max_lr:
        return []
    return [f"the learning rate {highest:g} is above {spec.usual_max_lr:g}; {spec.label} is usually trained at "
            f"far lower rates and a rate this high tends to destroy the model within a few steps"]


def _run(plan: Plan, job: _Job, model: DiffusionModel, emit: EventSink, control: Control | None,
         processes: Processes) -> JobResult:
    """Start or resume the loop; operating-system errors and running out of memory become one sentence."""
    output = OutputSpec(plan.final_dir, plan.name, overwrite=plan.overwrite,
                        settings={"method": plan.request.method, **dataclasses.asdict(plan.configs.method)})
    main = processes.is_main  # the main process alone tidies and creates folders; the others get its run folder
    if main:
        preflight.remove_stale_temporaries(plan.final_dir)
        preflight.remove_stale_temporaries(plan.logs / plan.spec.log_folder, recursive=True)  # runs killed earlier
    run_dir = plan.run_dir
    try:
        if run_dir is None:
            made = _start_run_dir(plan.logs, plan.spec.log_folder, plan.name, plan.request) if main else None
            run_dir = cast(Path, processes.share(made))  # the main process made it
            result = run_training(model, job.method, job.data, job.train_config, RunFolder(run_dir), output,
                                  on_event=emit, control=control, processes=processes, validation=job.validation)
        else:
            if main:
                preflight.remove_stale_temporaries(run_dir, recursive=True, older_than=0.0)
            processes.barrier()
            run = RunFolder(run_dir)
            config = dataclasses.replace(config_from_dict(run.load_config()), **plan.resume_changes)
            result = resume_training(model, job.method, job.data, run, output, on_event=emit, control=control,
                                     config=config, processes=processes, validation=job.validation)
    except OSError as exc:
        if preflight.is_network_error(exc):
            raise preflight.network_error(exc, run_dir) from exc
        raise preflight.storage_error(exc, run_dir) from exc
    except (RuntimeError, MemoryError) as exc:
        if not _out_of_memory(exc):
            raise
        raise preflight.out_of_memory(exc, model, run_dir) from exc
    message = outcome_message(result.step, result.interrupted, list(result.artifacts), result.run_dir,
                              job.method.state_policy.resume_state)
    return JobResult(list(result.artifacts), result.run_dir, result.step, result.interrupted, message)


def outcome_message(step: int, interrupted: bool, artifacts: Sequence[Path], run_dir: Path | None,
                    resumable: bool = True) -> str:
    """The one line a host shows when a job ends: what it wrote, or that it wrote nothing; and the size of the resume
    state where the method keeps one (`resumable`: DreamBooth keeps only its counters unless asked)."""
    verb = "interrupted at" if interrupted else "finished at"
    if artifacts:
        written = f"Wrote {', '.join(str(p) for p in artifacts)}."
    else:
        written = "Nothing was written (it stopped before its first step)." if step == 0 else "Nothing was written."
    where = f" Run folder: {run_dir}" if run_dir is not None else ""
    note = _state_note(run_dir, interrupted) if resumable else ""
    return f"Training {verb} step {step}. {written}{where}{note}"


def _state_note(run_dir: Path | None, interrupted: bool) -> str:
    """The resume state a run keeps and its size: a finished run keeps it too, so that it can be trained further
    exactly (same optimizer moments, data order and noise); the user who will not can delete it."""
    size = RunFolder(run_dir).state_bytes() if run_dir is not None else 0
    if not size:
        return ""
    megabytes = f"{size / 1e6:.1f} MB"
    if interrupted:
        return f" (its resume state, state/checkpoint.pt, is {megabytes})"
    return (f" (its resume state, state/checkpoint.pt, {megabytes}, lets --resume or the tab's Resume a run train it "
            f"further with more steps; delete the state folder if you will not)")


def _out_of_memory(exc: BaseException) -> bool:
    """torch's CUDA and CPU allocators, and Python's, each say it differently."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or \
        "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def _start_run_dir(logs: Path, log_folder: str, name: str, request: TrainRequest) -> Path:
    """Create a new run folder holding request.json; a failed write removes the folder again."""
    import datetime
    import json
    import shutil

    from finetune_core.formats.atomic import atomic_write
    now = datetime.datetime.now()
    base = logs / log_folder / now.strftime("%Y-%m-%d") / f"{name}-{now.strftime('%H%M%S')}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    text = json.dumps(dataclasses.asdict(request), indent=2, default=str)
    run_dir.mkdir(parents=True)
    try:
        atomic_write(run_dir / "request.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir


def _require_same_family(run_dir: Path, model: DiffusionModel) -> None:
    """A run resumes only on a model of the family it started with (its settings.json says which)."""
    import json

    try:
        started = json.loads((run_dir / "settings.json").read_text(encoding="utf-8"))["model"]
        family, name = str(started["family"]), started.get("name")
    except (OSError, ValueError, KeyError, TypeError):
        return  # no record to compare with: the resume state itself is checked when it loads
    if family != model.family:
        raise ModelMismatchError(f"{run_dir} was trained on {name} ({family.upper()}) but the loaded model is "
                                 f"{model.family.upper()}; resume it with a {family.upper()} model")
