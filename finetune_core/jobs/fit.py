"""Will this run fit, and with which settings: the measured peak memory of a method's training steps on a model
architecture (`train.memory`), and a planner that finds the cheapest changes that fit a memory size.

Used by the CLI (`estimate`), the tab's Estimate memory, REST and the pre-flight check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune_core.data.dataset_config import DatasetConfig
from finetune_core.errors import ConfigError, OutOfMemory
from finetune_core.jobs.request import build_config, form_defaults, method_spec
from finetune_core.model.full_size import fake_model
from finetune_core.model.tiny import TINY_MODELS, build_tiny
from finetune_core.train.memory import (
    GIB,
    Hardware,
    Measurement,
    ShapeData,
    fake_device,
    free_device_memory,
    gib,
    measure_steps,
    real_device,
    with_8bit_adamw,
    with_medvram,
)
from finetune_core.train.train_config import TrainConfig, missing_optimizers

PRECISION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GB|GiB|G|MB|MiB|M)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'8GB' / '8 GiB' / '7.5G' / '6000MB' -> bytes (GB and GiB both mean 1024³, as cards are sold); ConfigError
    for anything else ('8', '-1GB', 'eight')."""
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"memory size {text!r} is not a size; write it with its unit, like 8GB, 12GB or 6000MB")
    unit = match.group(2).upper()[0]
    return int(float(match.group(1)) * (GIB if unit == "G" else 1024 ** 2))


@dataclass(frozen=True)
class Request:
    """What to measure: method, architecture (a full-size name or a tiny model), settings by section, hardware and
    the dtype the weights are loaded in (fp16: what the WebUI and most GPU users load)."""

    method: str
    model: str
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # "method" / "data" / "train"
    hardware: Hardware = Hardware()
    weights: str = "fp16"

    def with_settings(self, section: str, **values: Any) -> Request:
        merged = {s: dict(v) for s, v in self.settings.items()}
        merged.setdefault(section, {}).update(values)
        return dataclasses.replace(self, settings=merged)

    def setting(self, section: str, name: str, configs: Mapping[str, Any]) -> Any:
        return getattr(configs[section], name)


def configs_for(request: Request) -> dict[str, Any]:
    """The validated settings dataclasses of a request (a setting the method does not have is a ConfigError)."""

    spec = method_spec(request.method)
    defaults = form_defaults(request.method)
    problems: list[str] = []
    configs: dict[str, Any] = {}
    data = {"data_dir": ".", **request.settings.get("data", {})}
    # an optimizer's package is needed to train, not to measure (the measurement models its state: a plan for a
    # GPU machine is made where bitsandbytes, which needs CUDA, is not installed)
    train_settings = dict(request.settings.get("train", {}))
    optimizer = train_settings.get("optimizer")
    if isinstance(optimizer, str) and optimizer in missing_optimizers():
        train_settings["optimizer"] = "adamw"
    for key, config_type, settings, what in (("method", spec.config_type, request.settings.get("method", {}),
                                              spec.label),
                                             ("data", DatasetConfig, data, "dataset"),
                                             ("train", TrainConfig, train_settings, "training")):
        try:
            configs[key] = build_config(config_type, defaults[key], settings, what)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if request.weights not in PRECISION_DTYPES:
        problems.append(f"weights {request.weights!r} is not one of {', '.join(PRECISION_DTYPES)}")
    if train_settings.get("optimizer") != optimizer and "train" in configs:
        configs["train"] = dataclasses.replace(configs["train"], optimizer=optimizer)
    problems += request.hardware.problems()
    if problems:
        raise ConfigError(problems)
    return configs


def measure(request: Request, fake: bool = True) -> Measurement:
    """The peak device memory of two training steps of the request, measured on fake tensors (`fake=False`: the
    same steps on a real tiny model, counted by the same tracker; tests compare the two)."""

    if fake:
        with _FAKE_MODELS.lock:
            return run_steps(request, fake_device(_FAKE_MODELS.mode),
                             lambda dtype: _FAKE_MODELS.model(request.model, dtype))
    return run_steps(request, real_device(), lambda dtype: build_tiny(request.model, dtype=dtype))


class _FakeModels:
    """The fake models measured so far, built once and reused (a plan measures one architecture several times):
    one `FakeTensorMode` for all of them (a fake tensor belongs to the mode that made it), the last two (name,
    dtype) kept. A measurement leaves a model as it found it (a training session restores its weights, a method's
    adapters and hooks come off); one measurement at a time uses them."""

    KEPT = 2

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._mode: Any = None
        self._models: dict[tuple[str, torch.dtype], Any] = {}

    @property
    def mode(self) -> Any:
        if self._mode is None:
            from torch._subclasses.fake_tensor import FakeTensorMode

            self._mode = FakeTensorMode(allow_non_fake_inputs=True)
        return self._mode

    def model(self, name: str, dtype: torch.dtype) -> Any:
        """The fake model `name` in `dtype` (call it inside `fake_device(self.mode)`)."""
        key = (name, dtype)
        if key not in self._models:
            model = fake_model(name, dtype)
            while len(self._models) >= self.KEPT:
                self._models.pop(next(iter(self._models)))
            self._models[key] = model
        return self._models[key]


_FAKE_MODELS = _FakeModels()


def run_steps(request: Request, device: contextlib.AbstractContextManager[Any], build: Callable[[torch.dtype], Any],
              steps: int = 2, after_step: Callable[[int], None] | None = None) -> Measurement:
    """Build the model (`build(dtype)`) and the method inside `device` (a tracker context of `train.memory`) and
    run `steps` steps of the request on batches of its shapes."""

    configs = configs_for(request)
    spec = method_spec(request.method)
    data, train = configs["data"], configs["train"]
    per_process = -(-data.batch_size // request.hardware.processes)  # the largest share of a batch
    with tempfile.TemporaryDirectory() as folder, device as tracker:
        model = build(PRECISION_DTYPES[request.weights])
        method = spec.build(model, "measured", configs["method"], Path(folder), 0)
        shapes = ShapeData(per_process, data.width, data.height, f"a photo of {method.placeholder}",
                           model.latent_channels, model.vae_scale,
                           paired=spec.pairs_class_images(configs["method"]),
                           keep_pixels=bool(spec.dataset_needs(configs["method"]).get("keep_pixels")))
        return measure_steps(tracker, model, method, shapes, train, request.hardware, steps, after_step)


# --- the planner ------------------------------------------------------------------------------------------------------
CARD_RESERVE = 512 * 1024 ** 2  # a card's CUDA context and the allocator's slack: not in the measured peak


@dataclass(frozen=True)
class Change:
    """One change of a plan, with the peak once it (and the changes before it) apply."""

    what: str
    flags: tuple[str, ...]  # CLI flags (empty for a WebUI launch option)
    settings: Mapping[str, Mapping[str, Any]]  # section -> values, for the tab's Apply
    peak_bytes: int
    note: str = ""


@dataclass(frozen=True)
class Plan:
    """The cheapest changes that fit `target_bytes` (empty when the settings fit as they are)."""

    start: Measurement
    target_bytes: int
    changes: tuple[Change, ...]
    final: Measurement
    request: Request

    @property
    def peak_bytes(self) -> int:
        return self.final.peak_bytes

    def flags(self) -> list[str]:
        return [flag for change in self.changes for flag in change.flags]

    def settings(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for change in self.changes:
            for section, values in change.settings.items():
                out.setdefault(section, {}).update(values)
        return out

    def describe(self) -> str:
        if not self.changes:
            return f"Fits {gib(self.target_bytes)} as it is: {self.start.describe()}."
        steps = "; ".join(f"{c.what} -> {gib(c.peak_bytes)}" + (f" ({c.note})" if c.note else "")
                          for c in self.changes)
        return (f"Needs {gib(self.start.peak_bytes)}, over {gib(self.target_bytes)}. Plan: {steps}. "
                f"Then: {self.final.describe()}.")


Step = Callable[[Request], Request]


def _candidates(request: Request, configs: Mapping[str, Any]) -> list[tuple[str, tuple[str, ...], Step, str]]:
    """The changes that apply to these settings, cheapest in speed first: (what, CLI flags, how it changes a
    request, note). Resolutions come last, largest first; a plan keeps the last one it needed."""
    method, data, train = configs["method"], configs["data"], configs["train"]
    out: list[tuple[str, tuple[str, ...], Step, str]] = []
    if train.optimizer in ("adamw", "adam"):
        out.append(("8-bit AdamW", ("--optimizer", "adamw8bit"),
                    lambda r: r.with_settings("train", optimizer="adamw8bit"), "needs the bitsandbytes package"))
    if request.weights == "fp32":
        out.append(("fp16 weights and autocast", ("--precision", "fp16"),
                    lambda r: dataclasses.replace(r.with_settings("train", precision="fp16"), weights="fp16"),
                    "load the model in fp16"))
    if method_spec(request.method).trains_text_encoders(method):
        out.append(("frozen text encoders (outputs cached)", ("--no-train-text-encoder",),
                    lambda r: r.with_settings("method", train_text_encoder=False), "the text encoders no longer train"))
    if request.hardware.residency != "medvram":
        out.append(("medvram residency", (),
                    lambda r: dataclasses.replace(r, hardware=dataclasses.replace(r.hardware, residency="medvram")),
                    "WebUI: launch with --medvram or --lowvram; modules a step does not use stay in RAM"))
    if not train.gradient_checkpointing:
        out.append(("gradient checkpointing", ("--gradient-checkpointing",),
                    lambda r: r.with_settings("train", gradient_checkpointing=True), "about 30% slower steps"))
    if data.batch_size > 1:
        accumulation = train.gradient_accumulation * data.batch_size
        out.append((f"batch 1 x accumulation {accumulation}",
                    ("--batch-size", "1", "--gradient-accumulation", str(accumulation)),
                    lambda r: r.with_settings("data", batch_size=1).with_settings(
                        "train", gradient_accumulation=accumulation), "the same samples per step, one at a time"))
    side = max(data.width, data.height)
    for smaller in range(side - 128, 383, -128):
        width, height = data.width * smaller // side // 64 * 64, data.height * smaller // side // 64 * 64
        out.append((f"train at {width}x{height}", ("--width", str(width), "--height", str(height)),
                    functools.partial(_resized, width=width, height=height), "less detail learned"))
    return out


# changes whose measurement is computed from the one before (exactly: tests), not measured again
COMPUTED: dict[str, Callable[[Measurement], Measurement | None]] = {"8-bit AdamW": with_8bit_adamw,
                                                                     "medvram residency": with_medvram}


def _resized(request: Request, width: int, height: int) -> Request:
    return request.with_settings("data", width=width, height=height)


def plan_fit(request: Request, target_bytes: int, start: Measurement | None = None) -> Plan:
    """Apply the changes cheapest first, measuring after each, until the peak fits `target_bytes`; a ConfigError
    saying the smallest peak reachable and what dominates it when nothing fits."""
    start = start or measure(request)
    if start.peak_bytes <= target_bytes:
        return Plan(start, target_bytes, (), start, request)
    changes: list[Change] = []
    current, best = request, start
    for what, flags, step, note in _candidates(request, configs_for(request)):
        changed = step(current)
        computed = COMPUTED.get(what)  # `best` is the measurement of `current`
        measured = (computed and computed(best)) or measure(changed)
        if measured.peak_bytes >= best.peak_bytes:
            continue  # no gain: leave it out
        if what.startswith("train at") and changes and changes[-1].what.startswith("train at"):
            changes.pop()  # one resolution: the last one tried
        changes.append(Change(what, flags, _diff(current, changed), measured.peak_bytes, note))
        current, best = changed, measured
        if best.peak_bytes <= target_bytes:
            return Plan(start, target_bytes, tuple(changes), best, current)
    tried = "; ".join(c.what for c in changes) or "no change helps"
    raise ConfigError(f"this run cannot fit {gib(target_bytes)} with any change the planner knows: the smallest peak "
                      f"reachable is {gib(best.peak_bytes)} ({tried}), dominated by {best.dominant} "
                      f"({gib(best.by_category[best.dominant])}); use a card with more memory or a smaller model")


def _diff(before: Request, after: Request) -> dict[str, dict[str, Any]]:
    """The settings `after` changes from `before`, by section."""
    out: dict[str, dict[str, Any]] = {}
    for section, values in after.settings.items():
        old = before.settings.get(section, {})
        changed = {k: v for k, v in values.items() if old.get(k, object()) != v}
        if changed:
            out[section] = changed
    return out


# --- the hosts' questions -------------------------------------------------------------------------------------------
ARCHITECTURE_OF_FAMILY = {"sd1": "sd15-full", "sd2": "sd2-full", "sdxl": "sdxl-full"}
DTYPE_NAMES = {dtype: name for name, dtype in PRECISION_DTYPES.items()}


def report(request: Request, size: str | None) -> dict[str, Any]:
    """The measurement and, for a card `size` (or the CUDA device's free memory when None), the plan, as the CLI's
    --json and REST's /estimate give them."""

    target = parse_size(size) - CARD_RESERVE if size else (free_device_memory("cuda")
                                                           if torch.cuda.is_available() else None)
    measured = measure(request)
    out: dict[str, Any] = {"method": request.method, "model": request.model, "peak_bytes": measured.peak_bytes,
                           "by_category": measured.by_category}
    if target is None:
        return out
    plan = plan_fit(request, target, measured)
    out.update(target_bytes=plan.target_bytes, plan_peak_bytes=plan.peak_bytes,
               plan=[{"change": c.what, "flags": list(c.flags), "settings": c.settings, "peak_bytes": c.peak_bytes,
                      "note": c.note} for c in plan.changes],
               plan_flags=plan.flags(), plan_by_category=plan.final.by_category, plan_text=plan.describe())
    return out


def can_measure() -> bool:
    """The measurement builds the architecture with diffusers (absent inside the WebUI)."""
    import importlib.util

    return importlib.util.find_spec("diffusers") is not None


def architecture_of(model: Any) -> str:
    """The architecture name of a loaded model: a tiny model's own, else its family's full size."""

    name = model.identity.name
    return name if name in TINY_MODELS else ARCHITECTURE_OF_FAMILY[model.family]


def request_for(method: str, model: Any, settings: Mapping[str, Mapping[str, Any]], processes: int = 1) -> Request:
    """The measurement of a run of `method` on the loaded `model` with these typed settings."""
    return Request(method, architecture_of(model), settings, Hardware(processes=processes),
                   DTYPE_NAMES.get(model.dtype, "fp16"))


def check_fits(request: Request, device: Any, free: int | None) -> None:
    """Refuse (OutOfMemory) a run whose measured peak exceeds the device's free memory, saying the plan that
    fits; nothing when the device's memory is unknown (a CPU) or the run fits."""

    if free is None:
        return
    measured = measure(request)
    if measured.peak_bytes <= free:
        return
    head = (f"this run needs {gib(measured.peak_bytes)} on {device}, which has {gib(free)} free: it would run out of "
            f"memory ({measured.describe()})")
    try:
        plan = plan_fit(request, free, measured)
    except ConfigError as exc:
        raise OutOfMemory(f"{head}; {exc}") from None
    flags = " ".join(plan.flags())
    raise OutOfMemory(f"{head}. {plan.describe()}" + (f" Command-line flags: {flags}" if flags else ""))
