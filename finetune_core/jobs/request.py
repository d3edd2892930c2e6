"""A training request: its fields, and every check of it that needs no model (types, ranges, names, the dataset
folder, the template, the file to continue from, existing files, the output folders).

Hosts call `plan_request` once, before they load a model or accept a job, so a bad request is answered at once and
leaves nothing on disk; they pass the Plan on to `service.train_plan`, which builds from it without checking again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_core.data.dataset_config import DatasetConfig
from finetune_core.data.masks import check_mask
from finetune_core.data.scan import attention_masks, image_files
from finetune_core.data.templates import load_template
from finetune_core.data.transforms import probe_image
from finetune_core.errors import ArtifactError, ConfigError, DatasetError, ModelMismatchError
from finetune_core.formats.atomic import require_finite
from finetune_core.formats.inspect import inspect_file, tensors_of
from finetune_core.formats.kinds import KIND_OF_FOLDER
from finetune_core.formats.names import find_artifact, refuse_same_name, sanitize_name
from finetune_core.jobs.preflight import check_writable
from finetune_core.methods import METHODS, MethodConfig, MethodSpec
from finetune_core.settings import Kind, coerce_settings, coerce_value
from finetune_core.train.lr_schedule import Schedule, nothing_to_train, parse_schedule, run_length
from finetune_core.train.run_folder import RunFolder
from finetune_core.train.train_config import TrainConfig


@dataclass(frozen=True)
class OutputFolders:
    """Where artefacts and run logs go; laid out like the WebUI's folders."""

    embeddings: Path
    hypernetworks: Path
    checkpoints: Path
    aesthetic_embeddings: Path
    logs: Path  # run folders: <logs>/<method>/<YYYY-MM-DD>/<name>-<HHMMSS>/
    loras: Path | None = None  # None: <models folder>/Lora beside the checkpoints, as the WebUI's --lora-dir default

    @classmethod
    def standalone(cls, root: str | Path) -> OutputFolders:
        """The standalone layout under one output folder (default `./outputs`)."""
        base = Path(root)
        return cls(embeddings=base / "embeddings", hypernetworks=base / "models" / "hypernetworks",
                   checkpoints=base / "models" / "Stable-diffusion",
                   aesthetic_embeddings=base / "models" / "aesthetic_embeddings", logs=base / "runs",
                   loras=base / "models" / "Lora")

    def for_kind(self, kind: str) -> Path:
        """The folder for an output kind named by a MethodSpec ("embeddings", "hypernetworks", ...)."""
        return {"embeddings": self.embeddings, "hypernetworks": self.hypernetworks, "checkpoints": self.checkpoints,
                "aesthetic_embeddings": self.aesthetic_embeddings,
                "loras": self.loras or self.checkpoints.parent / "Lora"}[kind]


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


def method_spec(method: str) -> MethodSpec:
    """The registry entry for `method`, or a ConfigError listing the known methods."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method]


def form_defaults(method: str) -> dict[str, dict[str, Any]]:
    """Default values of every setting a method's forms show, with the method's overrides applied."""
    spec = method_spec(method)
    return {"method": _defaults(spec.config_type), "data": {**_defaults(DatasetConfig), **spec.data_defaults},
            "train": {**_defaults(TrainConfig), **spec.train_defaults}}


def _defaults(config_type: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(config_type) if f.default is not dataclasses.MISSING}


def build_config(config_type: type, defaults: Mapping[str, Any], settings: Mapping[str, Any], what: str) -> Any:
    """A validated settings dataclass from defaults + user settings; unknown keys and bad values are ConfigErrors.

    `settings` must already have their fields' types (JSON values, argparse or form output after `from_text`
    coercion): "false" for a bool or "10" for a number is refused here, never cast.
    """
    known = {f.name for f in dataclasses.fields(config_type)}
    values = {**{k: v for k, v in defaults.items() if k in known}, **coerce_settings(config_type, settings, what)}
    config = config_type(**values)
    config.validate()
    return config


def request_from_json(body: Mapping[str, Any]) -> TrainRequest:
    """A TrainRequest from a JSON object; unknown fields and values of the wrong type are ConfigErrors."""
    unknown = sorted(set(body) - _REQUEST_FIELDS)
    if unknown:
        raise ConfigError(f"unknown field(s) in the train request: {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(_REQUEST_FIELDS))}")
    return _typed_request(TrainRequest(**{"method": "", "name": "", **body}))


_REQUEST_FIELDS = {f.name for f in dataclasses.fields(TrainRequest)}


def _typed_request(request: TrainRequest) -> TrainRequest:
    """The request with every top-level field checked for its type (settings are checked by `build_config`)."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    fields: tuple[tuple[str, Kind, bool], ...] = (("method", "str", False), ("name", "str", False),
                                                  ("overwrite", "bool", False), ("resume_run", "str", True))
    for name, kind, optional in fields:
        try:
            values[name] = coerce_value(getattr(request, name), kind, optional, name)
        except ConfigError as exc:
            problems.extend(exc.problems)
    for name in ("method_settings", "data_settings", "train_settings"):
        values[name] = getattr(request, name)
        if not isinstance(values[name], Mapping):
            problems.append(f"{name} must be an object of setting names and values, not {values[name]!r}")
    if problems:
        raise ConfigError(problems)
    values["resume_run"] = values["resume_run"] or None
    return TrainRequest(**{**values, **{k: dict(values[k]) for k in ("method_settings", "data_settings",
                                                                     "train_settings")}})


@dataclass(frozen=True)
class RunConfigs:
    """The validated settings of a run, one dataclass per form section."""

    method: MethodConfig  # an instance of the method's `config_type`
    data: DatasetConfig
    train: TrainConfig


@dataclass
class Plan:
    """A checked request: what will run, where it writes, and the validated settings."""

    request: TrainRequest  # as it will run (a resume's saved request, with this request's overwrite)
    spec: MethodSpec
    name: str
    configs: RunConfigs
    schedule: Schedule  # the learning-rate schedule of `configs.train`, parsed once
    final_dir: Path
    overwrite: bool  # asked for, or continuing a file in place
    run_dir: Path | None  # the run folder when resuming
    logs: Path  # where new run folders go
    resume_changes: dict[str, Any] = field(default_factory=dict)  # training settings a resume changes
    notes: list[str] = field(default_factory=list)  # one line per change, for the host to show


def plan_request(request: TrainRequest, folders: OutputFolders, template_dirs: Sequence[Path] = (),
                 family: str | None = None) -> Plan:
    """Check everything about a training request that needs no model; the Plan says what will run and where.

    `family` is the family of the model the job will train on where the host knows it before loading (the WebUI's
    loaded model, a built-in name): a file to continue from must be of it. A resume plans the run's saved request
    (this request's `overwrite` counts too). Creates nothing.
    """
    request = _typed_request(request)
    run_dir = Path(request.resume_run) if request.resume_run else None
    changes: dict[str, Any] = {}
    notes: list[str] = []
    if run_dir is not None:
        saved = _saved_request(run_dir, request)
        changes = resume_changes(saved, request)
        started = {**form_defaults(saved.method)["train"], **saved.train_settings}
        notes = [_change_note(key, value, started.get(key)) for key, value in changes.items()]
        request = dataclasses.replace(saved, train_settings={**saved.train_settings, **changes})
    spec = method_spec(request.method)
    name = sanitize_name(request.name)
    configs = _configs(spec, request, name, template_dirs)
    configs = dataclasses.replace(configs, method=spec.resolve(configs.method, configs.data,
                                                               folders.logs / spec.log_folder))
    schedule = parse_schedule(configs.train.learning_rate, configs.train.steps)
    final_dir = (run_output_dir(run_dir) if run_dir is not None else None) or folders.for_kind(spec.output_kind)
    continue_from = spec.continue_from(configs.method)
    continued_step = _check_continue_from(continue_from, final_dir, spec.output_kind, family) if continue_from else 0
    overwrite = request.overwrite or (bool(continue_from) and _same_stem(continue_from, final_dir, name))
    if run_dir is None and not overwrite:
        refuse_same_name(final_dir, name, spec.output_kind)
    spec.check_request(configs.method, name, final_dir, overwrite or run_dir is not None)
    if run_dir is None:
        _check_steps_left(continued_step, schedule, configs.train.steps)
    check_writable(final_dir, "output folder")
    check_writable(run_dir or folders.logs, "run folder")
    if configs.data.cache_dir.strip():
        check_writable(Path(configs.data.cache_dir).expanduser(), "latent cache folder (cache_dir)")
    return Plan(request, spec, name, configs, schedule, final_dir, overwrite, run_dir, folders.logs, changes, notes)


# Training settings a resume may change: they decide when the run stops and what it writes, not the maths of the
# steps it has already taken (an exact resume stays exact up to the step it was saved at).
CHANGEABLE_ON_RESUME = ("steps", "save_every", "save_keep_last", "preview_every", "csv_every", "preview_prompt",
                        "preview_negative_prompt", "preview_steps", "preview_sampler", "preview_cfg_scale",
                        "preview_seed", "preview_width", "preview_height")


def resume_changes(saved: TrainRequest, given: TrainRequest) -> dict[str, Any]:
    """The training settings `given` changes in the run `saved` describes; a ConfigError for any other setting
    given with a value other than the run's own (the name, the method's and the dataset's settings, the maths)."""
    defaults = form_defaults(saved.method)
    problems: list[str] = []
    changes: dict[str, Any] = {}
    if given.name and given.name != saved.name:
        problems.append(f"the name is {saved.name!r} in this run, not {given.name!r}")
    for section, key in (("method", "method_settings"), ("data", "data_settings"), ("train", "train_settings")):
        old_values = {**defaults[section], **getattr(saved, key)}
        for name, value in getattr(given, key).items():
            old = old_values.get(name)
            if value == old:
                continue
            if section == "train" and name in CHANGEABLE_ON_RESUME:
                changes[name] = value
            else:
                problems.append(f"{name} is {old!r} in this run, not {value!r}")
    if problems:
        raise ConfigError(f"a resumed run keeps its own settings (only max steps, saving, the loss CSV and previews "
                          f"can change): {'; '.join(problems)}; leave these out to resume {saved.resume_run}, or "
                          f"start a new run to change them")
    return changes


def _change_note(name: str, value: Any, old: Any) -> str:
    """The one line a host shows for a setting a resume changes."""
    if name == "steps":
        return f"resuming with max steps {value} (the run was started with {old}): it now stops at step {value}"
    return f"resuming with {name} {value!r} (the run was started with {old!r})"


def run_output_dir(run_dir: Path) -> Path | None:
    """The folder a run writes its final artefact into, as its settings.json records it (None when unrecorded)."""
    import json
    try:
        recorded = json.loads((run_dir / "settings.json").read_text(encoding="utf-8"))["output"]["dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Path(recorded) if isinstance(recorded, str) and recorded else None


def _configs(spec: MethodSpec, request: TrainRequest, name: str, template_dirs: Sequence[Path]) -> RunConfigs:
    """The three settings dataclasses, every problem at once; then the template and the dataset folder."""
    defaults = form_defaults(request.method)
    problems: list[str] = []
    configs: dict[str, Any] = {}
    for key, config_type, settings, what in (
            ("method", spec.config_type, request.method_settings, spec.label),
            ("data", DatasetConfig, {**request.data_settings, "placeholder": name}, "dataset"),
            ("train", TrainConfig, request.train_settings, "training")):
        try:
            configs[key] = build_config(config_type, defaults[key], settings, what)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    data = dataclasses.replace(configs["data"], **spec.dataset_needs(configs["method"]))
    data = _with_template_path(data, template_dirs)
    if spec.needs_name_in_prompt:
        _require_name_in_template(data)
    images, _ = image_files(Path(data.data_dir), data.recursive)
    _require_a_readable_image(images, Path(data.data_dir))
    if data.attention_masks:
        _check_masks(data)
    if data.batch_size > len(images):
        raise DatasetError(f"the batch size {data.batch_size} is larger than the dataset: {data.data_dir} has "
                           f"{len(images)} image(s); lower the batch size to {len(images)} or add images")
    check_validation(data, configs["train"], len(images))
    return RunConfigs(configs["method"], data, configs["train"])


def check_validation(data: Any, train: Any, images: int) -> None:
    """The validation set (issue 23): asked for only with the validation loss on, a folder with images, a split
    that leaves a batch to train on."""
    if (data.validation_dir.strip() or data.validation_split) and not train.validation_every:
        raise ConfigError("a validation set is given (validation_dir or validation_split) but the validation loss is "
                          "off; set validation_every (e.g. --validation-every 50), or clear the validation set")
    if data.validation_dir.strip():
        folder = Path(data.validation_dir)
        if not folder.is_dir():
            raise DatasetError(f"the validation folder {folder} does not exist; choose a folder of images")
        image_files(folder, data.recursive)  # a DatasetError saying what the folder holds when it has no image
    if data.validation_split and images - data.validation_split < data.batch_size:
        raise DatasetError(f"validation_split {data.validation_split} is too large: {data.data_dir} has {images} "
                           f"image(s), so {max(0, images - data.validation_split)} would be left to train on with "
                           f"a batch size of {data.batch_size}; hold out at most {max(0, images - data.batch_size)}")


def _require_a_readable_image(images: Sequence[Path], folder: Path) -> None:
    """At least one image decodes (usually the first: one file read); a folder of only damaged files is refused
    now rather than by the job."""
    reasons = []
    for path in images:
        try:
            probe_image(path.read_bytes(), path)
            return
        except (DatasetError, OSError) as exc:
            reasons.append(f"{path.name} ({str(exc.__cause__ or exc).splitlines()[0][:120]})")
    raise DatasetError(f"none of the {len(images)} images in the dataset folder {folder} could be read: "
                       f"{', '.join(reasons[:5])}{' ...' if len(reasons) > 5 else ''}; replace them with valid "
                       f"image files")


def _check_masks(data: DatasetConfig) -> None:
    """Every attention mask is a grayscale picture of its image's size (reads the masks)."""
    for image, mask in sorted(attention_masks(Path(data.data_dir), data.recursive).items()):
        check_mask(mask, image)


def _check_continue_from(reference: str, final_dir: Path, kind: str, family: str | None) -> int:
    """The file to continue from exists, is of the right kind and model family (where both are known) and holds
    only finite numbers; returns its step."""
    expected = KIND_OF_FOLDER[kind]
    path = find_artifact(reference, final_dir, expected.suffixes, expected.name)
    info = inspect_file(path)
    if info.kind != expected.name:
        raise ArtifactError(f"{path} cannot be continued from: it is not {expected.a_name} ({info.describe()})")
    if family and info.family and info.family.lower() != family.lower():
        raise ModelMismatchError(f"{path} cannot be continued from: it was made for {info.family} models and the "
                                 f"model to train on is {family.upper()}; continue from a file made for "
                                 f"{family.upper()}, or load an {info.family} model")
    if info.vectors == 0:  # an embedding of no vectors (other kinds leave `vectors` unset or hold one)
        raise ArtifactError(f"{path} cannot be continued from: it holds 0 vectors, so there is nothing to train; "
                            f"start a new embedding or continue from another file")
    require_finite(tensors_of(path), path)
    return info.step or 0


def _check_steps_left(step: int, schedule: Schedule, steps: int) -> None:
    """A file continued from at or past the step this run stops at would be written back unchanged."""
    problem = nothing_to_train(step, run_length(schedule, steps))
    if problem:
        raise ConfigError(problem)


def _with_template_path(config: DatasetConfig, template_dirs: Sequence[Path]) -> DatasetConfig:
    """A template named like the WebUI's (a basename) is looked up in the host's template folders first."""
    for folder in template_dirs:
        matches = sorted(Path(folder).rglob(config.template)) if Path(folder).is_dir() else []
        if matches and not Path(config.template).is_absolute():
            return dataclasses.replace(config, template=str(matches[0]))
    return config


def _require_name_in_template(config: DatasetConfig) -> None:
    """A method that trains the word `[name]` learns nothing from a template that never says it."""
    lines = load_template(config.template)
    if not any("[name]" in line for line in lines):
        raise ConfigError(f"the prompt template {config.template!r} never uses [name], so the embedding would never "
                          f"appear in a prompt and nothing would train; pick a template with [name] such as "
                          f"style_filewords.txt or subject.txt")


def _same_stem(reference: str, final_dir: Path, name: str) -> bool:
    path = Path(reference)
    return path.stem == name and (not path.parent.parts or path.parent.resolve() == final_dir.resolve())


def _saved_request(run_dir: Path, request: TrainRequest) -> TrainRequest:
    """The request a run was started with, so a resume rebuilds the same method and data; `--overwrite` given now
    counts too."""
    import json

    saved = run_dir / "request.json"
    if not saved.is_file():
        raise ConfigError(f"{run_dir} is not a run folder of this tool (no request.json); pass the folder that "
                          f"holds state/ and request.json")
    try:
        values = json.loads(saved.read_text(encoding="utf-8"))
        if not isinstance(values, dict) or set(values) - _REQUEST_FIELDS:
            raise ValueError("not a request written by this tool")
        old = _typed_request(TrainRequest(**{"method": "", "name": "", **values}))
    except (OSError, ValueError, TypeError, ConfigError) as exc:
        raise ConfigError(f"{saved} is damaged ({str(exc).splitlines()[0]}), so this run cannot be resumed; "
                          f"start a new run with the same settings") from exc
    if request.method and request.method != old.method:
        raise ConfigError(f"{run_dir} is a {old.method} run; resume it as {old.method}, not {request.method}")
    if not RunFolder(run_dir).has_state():
        raise ConfigError(f"{run_dir} has no resume state yet (it stopped before its first save); start a new run")
    return dataclasses.replace(old, resume_run=str(run_dir), overwrite=old.overwrite or request.overwrite)
