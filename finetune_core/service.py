"""The job API every host calls: create, train, lint, inspect. Hosts (CLI, Gradio tab, REST, WebUI) are thin on top.

A host supplies the loaded model and the folders; this module builds the dataset, the method and the loop from plain
settings dicts (what a form, a JSON body or argparse produces), so every host validates and fails the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_core.errors import ConfigError

if TYPE_CHECKING:
    from finetune_core.data.lint import LintReport
    from finetune_core.formats.inspect import ArtifactInfo
    from finetune_core.methods import MethodSpec
    from finetune_core.model.interface import DiffusionModel
    from finetune_core.train.control import Control
    from finetune_core.train.events import EventSink


@dataclass(frozen=True)
class OutputFolders:
    """Where artefacts and run logs go; laid out like the WebUI's folders."""

    embeddings: Path
    hypernetworks: Path
    checkpoints: Path
    aesthetic_embeddings: Path
    logs: Path  # run folders: <logs>/<method>/<YYYY-MM-DD>/<name>-<HHMMSS>/

    @classmethod
    def standalone(cls, root: str | Path) -> OutputFolders:
        """The standalone layout under one output folder (default `./outputs`)."""
        base = Path(root)
        return cls(embeddings=base / "embeddings", hypernetworks=base / "models" / "hypernetworks",
                   checkpoints=base / "models" / "Stable-diffusion",
                   aesthetic_embeddings=base / "models" / "aesthetic_embeddings", logs=base / "runs")

    def for_kind(self, kind: str) -> Path:
        """The folder for an output kind named by a MethodSpec ("embeddings", "hypernetworks", ...)."""
        return {"embeddings": self.embeddings, "hypernetworks": self.hypernetworks, "checkpoints": self.checkpoints,
                "aesthetic_embeddings": self.aesthetic_embeddings}[kind]


@dataclass
class TrainRequest:
    """Everything one training job needs, as plain values (JSON-serialisable).

    method: a key of `finetune_core.methods.METHODS` ("textual-inversion", "hypernetwork", ...).
    name: the artefact name (embedding word / hypernetwork name / checkpoint name).
    method_settings / data_settings / train_settings: field values of the method's Config, `DatasetConfig` and
    `TrainConfig`; missing fields take the method's defaults. `resume_run`: a run folder to continue exactly.
    """

    method: str
    name: str
    method_settings: dict[str, Any] = field(default_factory=dict)
    data_settings: dict[str, Any] = field(default_factory=dict)
    train_settings: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    resume_run: str | None = None


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

    from finetune_core.model.loading import load_model
    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(spec, device=chosen)


def method_spec(method: str) -> MethodSpec:
    """The registry entry for `method`, or a ConfigError listing the known methods."""
    from finetune_core.methods import METHODS
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method]


def form_defaults(method: str) -> dict[str, dict[str, Any]]:
    """Default values of every setting a method's forms show, with the method's overrides applied."""
    from finetune_core.data.config import DatasetConfig
    from finetune_core.train.config import TrainConfig
    spec = method_spec(method)
    return {"method": _defaults(spec.config_type), "data": {**_defaults(DatasetConfig), **spec.data_defaults},
            "train": {**_defaults(TrainConfig), **spec.train_defaults}}


def _defaults(config_type: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(config_type) if f.default is not dataclasses.MISSING}


def build_config(config_type: type, defaults: Mapping[str, Any], settings: Mapping[str, Any], what: str) -> Any:
    """A validated settings dataclass from defaults + user settings; unknown keys and bad values are ConfigErrors."""
    known = {f.name: f for f in dataclasses.fields(config_type)}
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ConfigError(f"unknown {what} setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {**{k: v for k, v in defaults.items() if k in known}, **settings}
    problems = []
    for name, value in list(values.items()):
        try:
            values[name] = _coerce(value, str(known[name].type))
        except (TypeError, ValueError):
            problems.append(f"{what} setting {name!r} must be {known[name].type}, got {value!r}")
    if problems:
        raise ConfigError(problems)
    config = config_type(**values)
    config.validate()
    return config


def _coerce(value: Any, type_name: str) -> Any:
    """Accept what forms and JSON send ("10" for 10, 10.0 for an int field), refusing anything lossy."""
    base = type_name.replace("typing.", "").split("|")[0].strip()
    if value is None or value == "" and "None" in type_name:
        return None if "None" in type_name else value
    if base == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, (bool, int)):
            return bool(value)
        raise ValueError(value)
    if base == "int":
        number = float(value)
        if number != int(number):
            raise ValueError(value)
        return int(number)
    if base == "float":
        return float(value)
    if base == "str":
        return str(value)
    return value


def create(method: str, name: str, settings: Mapping[str, Any], model: DiffusionModel, folders: OutputFolders,
           overwrite: bool = False) -> list[Path]:
    """Create a new, untrained artefact file (the WebUI's Create embedding / Create hypernetwork)."""
    from finetune_core.formats.names import sanitize_name
    spec = method_spec(method)
    if spec.create_type is None or spec.create is None:
        raise ConfigError(f"{spec.label} has no separate create step; train it directly")
    clean = sanitize_name(name)
    config = build_config(spec.create_type, form_defaults(method)["method"], settings, spec.label)
    return spec.create(model, clean, config, folders.for_kind(spec.output_kind), overwrite)


def lint(data_settings: Mapping[str, Any], method: str = "textual-inversion",
         model: DiffusionModel | None = None) -> LintReport:
    """Check a dataset before training: images, unreadable files, captions, sizes, token lengths, buckets."""
    from finetune_core.data.config import DatasetConfig
    from finetune_core.data.lint import lint_dataset
    config = build_config(DatasetConfig, form_defaults(method)["data"], data_settings, "dataset")
    return lint_dataset(config, token_counter=model.count_tokens if model is not None else None)


def inspect(path: str | Path) -> ArtifactInfo:
    """Say what an artefact file is (embedding, hypernetwork, checkpoint, aesthetic embedding, LoRA)."""
    from finetune_core.formats.inspect import inspect_file
    return inspect_file(path)


def train(request: TrainRequest, model: DiffusionModel, folders: OutputFolders, on_event: EventSink | None = None,
          control: Control | None = None, template_dirs: Sequence[Path] = ()) -> JobResult:
    """Run one training job to the end (or to an interrupt) and say what it wrote.

    Settings are validated before any work; an existing artefact is never replaced unless `overwrite` is set
    (continuing an embedding or hypernetwork in place counts as asked).
    """
    from finetune_core.train.events import Warning_, ignore_events
    from finetune_core.train.loop import OutputSpec, resume_training, run_training
    emit = on_event or ignore_events
    run_dir = Path(request.resume_run) if request.resume_run else None
    if run_dir is not None:
        request = _saved_request(run_dir, request)
    job = _prepare_job(request, model, folders, template_dirs)
    for message in job.warnings:
        emit(Warning_(message))
    from finetune_core.model.sampler import sample
    from finetune_core.train.run_folder import RunFolder
    output = OutputSpec(job.final_dir, job.name, overwrite=request.overwrite or job.in_place,
                        settings={"method": request.method, **job.method_settings})
    if run_dir is None:
        run_dir = _new_run_dir(folders, job.spec.log_folder, job.name)
        _write_request(run_dir, request)
        result = run_training(model, job.method, job.data, job.train_config, RunFolder(run_dir), output,
                              on_event=emit, control=control, sampler=sample)
    else:
        result = resume_training(model, job.method, job.data, RunFolder(run_dir), output, on_event=emit,
                                 control=control, sampler=sample)
    verb = "interrupted at" if result.interrupted else "finished at"
    written = ", ".join(str(p) for p in result.artifacts)
    message = f"Training {verb} step {result.step}. Wrote {written}. Run folder: {result.run_dir}"
    return JobResult(list(result.artifacts), result.run_dir, result.step, result.interrupted, message)


@dataclass
class _Job:
    spec: MethodSpec
    name: str
    method: Any
    method_settings: dict[str, Any]
    data: Any
    train_config: Any
    final_dir: Path
    in_place: bool
    warnings: list[str]


def _prepare_job(request: TrainRequest, model: DiffusionModel, folders: OutputFolders,
                 template_dirs: Sequence[Path]) -> _Job:
    """Validate every setting (all problems at once), then build the dataset and the method."""
    from finetune_core.cpu import autocast_problem
    from finetune_core.data.config import DatasetConfig
    from finetune_core.data.dataset import ImageDataset
    from finetune_core.formats.names import sanitize_name
    from finetune_core.train.config import TrainConfig
    from finetune_core.train.randomness import resolve_seed
    spec = method_spec(request.method)
    name = sanitize_name(request.name)
    defaults = form_defaults(request.method)
    problems: list[str] = []
    configs = {}
    for key, config_type, settings, what in (
            ("method", spec.config_type, request.method_settings, spec.label),
            ("data", DatasetConfig, {**request.data_settings, "placeholder": name}, "dataset"),
            ("train", TrainConfig, request.train_settings, "training")):
        try:
            configs[key] = build_config(config_type, defaults[key], settings, what)
        except ConfigError as exc:
            problems.extend(exc.problems)
    slow = autocast_problem(model.device, configs["train"].precision) if "train" in configs else None
    if problems or slow:
        raise ConfigError(problems + ([slow] if slow else []))
    data_config = _with_template_path(configs["data"], template_dirs)
    if getattr(spec.config_type, "needs_name_in_prompt", False):
        _require_name_in_template(data_config)
    data = ImageDataset(data_config, placeholder=name)
    final_dir = folders.for_kind(spec.output_kind)
    seed = resolve_seed(configs["train"].seed)
    method = spec.build(model, name, configs["method"], final_dir, seed)
    check = getattr(method, "check", None)
    warnings = list(check(model)) if check is not None else []
    continue_from = getattr(configs["method"], "continue_from", "")
    in_place = bool(continue_from) and _same_stem(continue_from, final_dir, name)
    return _Job(spec, name, method, dataclasses.asdict(configs["method"]), data,
                dataclasses.replace(configs["train"], seed=seed), final_dir, in_place, warnings)


def _with_template_path(config: Any, template_dirs: Sequence[Path]) -> Any:
    """A template named like the WebUI's (a basename) is looked up in the host's template folders first."""
    for folder in template_dirs:
        matches = sorted(Path(folder).rglob(config.template)) if Path(folder).is_dir() else []
        if matches and not Path(config.template).is_absolute():
            return dataclasses.replace(config, template=str(matches[0]))
    return config


def _require_name_in_template(config: Any) -> None:
    """A method that trains the word `[name]` learns nothing from a template that never says it."""
    from finetune_core.data.templates import load_template
    lines = load_template(config.template)
    if not any("[name]" in line for line in lines):
        raise ConfigError(f"the prompt template {config.template!r} never uses [name], so the embedding would never "
                          f"appear in a prompt and nothing would train; pick a template with [name] such as "
                          f"style_filewords.txt or subject.txt")


def _same_stem(reference: str, final_dir: Path, name: str) -> bool:
    path = Path(reference)
    return path.stem == name and (not path.parent.parts or path.parent.resolve() == final_dir.resolve())


def _new_run_dir(folders: OutputFolders, log_folder: str, name: str) -> Path:
    import datetime
    now = datetime.datetime.now()
    base = folders.logs / log_folder / now.strftime("%Y-%m-%d") / f"{name}-{now.strftime('%H%M%S')}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _write_request(run_dir: Path, request: TrainRequest) -> None:
    import json
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "request.json").write_text(json.dumps(dataclasses.asdict(request), indent=2, default=str))


def _saved_request(run_dir: Path, request: TrainRequest) -> TrainRequest:
    """The request a run was started with, so a resume rebuilds the same method and data."""
    import json
    saved = run_dir / "request.json"
    if not saved.is_file():
        raise ConfigError(f"{run_dir} is not a run folder of this tool (no request.json); pass the folder that "
                          f"holds state/ and request.json")
    values = json.loads(saved.read_text())
    values["resume_run"] = str(run_dir)
    return TrainRequest(**values)
