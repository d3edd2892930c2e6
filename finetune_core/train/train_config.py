"""`TrainConfig`: the loop's settings, with labels for forms, validation and versioned loading of saved configs.

Batch size belongs to the data config (`DatasetConfig.batch_size`), not here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from finetune_core.errors import ConfigError
from finetune_core.settings import type_problems
from finetune_core.train.lr_schedule import parse_schedule

CONFIG_VERSION = 1
OPTIMIZERS = ("adamw", "adam", "sgd", "adamw8bit", "prodigy", "lion")
# The optimizers of other packages: name -> (module, class, pip package).
OPTIONAL_OPTIMIZERS = {
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "lion": ("lion_pytorch", "Lion", "lion-pytorch"),
}
CLIP_MODES = ("disabled", "value", "norm")
PRECISIONS = ("fp32", "fp16", "bf16")
MAX_PREVIEW_SIZE = 4096  # as the training size (DatasetConfig): a larger image fits on no consumer device
MAX_PREVIEW_STEPS = 1000  # the scheduler has 1000 timesteps


def _f(default: Any, label: str, help: str, choices: tuple[str, ...] | None = None,
       available: Callable[[], dict[str, str]] | None = None) -> Any:
    """A dataclass field with the metadata a UI needs to build a form; `available` returns the choices that cannot
    be used here, each with why (forms and the CLI's help leave them out and say so)."""
    meta: dict[str, Any] = {"label": label, "help": help}
    if choices is not None:
        meta["choices"] = list(choices)
    if available is not None:
        meta["unavailable"] = available
    return field(default=default, metadata=meta)


def missing_optimizers() -> dict[str, str]:
    """The optimizers whose package is not installed here -> what to install (looked up without importing it)."""
    import importlib.util

    return {name: f"pip install {package}" for name, (module, _, package) in OPTIONAL_OPTIMIZERS.items()
            if importlib.util.find_spec(module.split(".")[0]) is None}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (WebUI Train tab names in the help texts)."""

    version: int = _f(CONFIG_VERSION, "Config version", "Format version of saved configs; upgraded on load.")
    steps: int = _f(100000, "Max steps", "Stop after this many optimizer steps (the schedule may stop earlier).")
    learning_rate: str = _f("0.005", "Learning rate",
                            "A rate, or a schedule like '0.005:100, 1e-3:1000, 1e-5' (rate until step; "
                            "training stops when the schedule runs out).")
    gradient_accumulation: int = _f(1, "Gradient accumulation steps",
                                    "Micro-batches per optimizer step; one step = batch size x this many images.")
    optimizer: str = _f("adamw", "Optimizer", "adamw8bit needs bitsandbytes, prodigy prodigyopt, lion lion-pytorch.",
                        OPTIMIZERS, missing_optimizers)
    weight_decay: float | None = _f(None, "Weight decay", "Empty: the method's default.")
    adam_beta1: float = _f(0.9, "Adam beta 1", "First-moment decay of Adam-style optimizers.")
    adam_beta2: float = _f(0.999, "Adam beta 2", "Second-moment decay of Adam-style optimizers.")
    adam_epsilon: float = _f(1e-8, "Adam epsilon", "Denominator guard of Adam-style optimizers.")
    momentum: float = _f(0.0, "SGD momentum", "Momentum of the sgd optimizer.")
    clip_grad_mode: str = _f("disabled", "Gradient clipping", "Clip each gradient value, or the total norm.",
                             CLIP_MODES)
    clip_grad_value: str = _f("0.1", "Clip value", "A number, or a schedule with the learning-rate syntax.")
    precision: str = _f("fp32", "Precision", "Autocast dtype of the forward pass; fp16 uses a grad scaler on CUDA. "
                        "A model loaded in fp16 (the WebUI without --no-half) computes in fp16 whatever is chosen.",
                        PRECISIONS)
    gradient_checkpointing: bool = _f(True, "Gradient checkpointing",
                                      "Recompute the UNet's blocks in backward instead of storing them: much less "
                                      "memory for about a third more time per step (the WebUI's trainers always "
                                      "use it).")
    min_snr_gamma: float = _f(0.0, "Min-SNR gamma", "Min-SNR loss weighting (Hang et al. 2023); 0 = off, 5 is usual.")
    noise_offset: float = _f(0.0, "Noise offset", "Adds offset x per-channel noise; 0 = off, 0.1 is usual.")
    seed: int = _f(0, "Seed", "Seed of noise, timesteps and data order; -1 = random (recorded in the run folder).")
    save_every: int = _f(500, "Save a copy every N steps", "Intermediate artefact and resume state; 0 = off.")
    save_keep_last: int = _f(0, "Keep the last N copies", "Intermediate copies kept in the run folder: older ones are "
                         "deleted as new ones are saved (a checkpoint is 2-7 GB); 0 keeps every copy.")
    preview_every: int = _f(500, "Save an image every N steps", "Preview image into the run folder; 0 = off.")
    preview_prompt: str = _f("", "Preview prompt", "Empty: the current training prompt.")
    preview_negative_prompt: str = _f("", "Preview negative prompt", "")
    preview_steps: int = _f(20, "Preview sampling steps", "")
    preview_sampler: str = _f("DPM++ 2M", "Preview sampler", "A sampler name as in the WebUI's txt2img (inside "
                              "the WebUI its own samplers run; standalone: DPM++ 2M, DPM++ 2M Karras, Euler, "
                              "Euler a, DDIM, UniPC, Heun).")
    preview_cfg_scale: float = _f(7.0, "Preview CFG scale", "")
    preview_seed: int = _f(-1, "Preview seed", "The same for every preview of a run so steps compare side by side; "
                           "-1: derived from the run seed.")
    preview_width: int = _f(0, "Preview width", "0: the training width.")
    preview_height: int = _f(0, "Preview height", "0: the training height.")
    nan_guard_bad_steps: int = _f(3, "Bad steps before rollback",
                                  "After this many non-finite steps in a row, go back to the last good state.")
    nan_guard_max_rollbacks: int = _f(3, "Rollbacks before giving up",
                                      "Stop with advice after this many rollbacks.")
    nan_guard_snapshot_every: int = _f(100, "Keep a good state every N steps",
                                       "In-memory copy of the trainable state for rollback (also at every save).")
    nan_guard_lr_factor: float = _f(0.5, "Learning-rate factor on rollback", "")
    csv_every: int = _f(500, "Write loss CSV every N steps", "0 = off.")
    validation_every: int | None = _f(None, "Validation loss every N steps",
                                      "The loss on the validation set (the dataset's validation folder or held-out "
                                      "images, else the training images) at fixed timesteps and noise, every N "
                                      "steps and at every save; empty = off.")
    early_stop_patience: int = _f(0, "Early stop after K evaluations", "Stop when the validation loss has not gone "
                                  "below its best for K evaluations in a row (needs the validation loss); 0 = off.")
    save_optimizer_state: bool = _f(False, "Save optimizer state with the artefact",
                                    "The run folder always keeps it for resuming.")

    def validate(self) -> None:
        """Raise one ConfigError listing every problem; never changes the config."""
        problems = [p for check in _CHECKS for p in check(self)]
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return dataclasses.asdict(self)


def config_fields() -> list[dataclasses.Field]:  # type: ignore[type-arg]
    """The fields with their labels, help texts and choices, in form order."""
    return list(dataclasses.fields(TrainConfig))


def _counts(c: TrainConfig) -> list[str]:
    out = []
    if _is_int(c.steps) and c.steps <= 0:
        out.append(f"Max steps (steps) must be more than 0, not {c.steps}")
    for name in ("gradient_accumulation", "preview_steps", "nan_guard_bad_steps", "nan_guard_max_rollbacks"):
        value = getattr(c, name)
        if _is_int(value) and value < 1:
            out.append(f"{name} must be at least 1, not {value}")
    for name in ("save_every", "save_keep_last", "preview_every", "csv_every", "nan_guard_snapshot_every",
                 "preview_width", "preview_height"):
        value = getattr(c, name)
        if _is_int(value) and value < 0:
            out.append(f"{name} must be 0 (off) or more, not {value}")
    for name in ("preview_width", "preview_height"):
        value = getattr(c, name)
        if _is_int(value) and (value % 8 or value > MAX_PREVIEW_SIZE):
            out.append(f"{name} must be a multiple of 8 up to {MAX_PREVIEW_SIZE}, not {value}")
    if isinstance(c.validation_every, int) and not isinstance(c.validation_every, bool) and c.validation_every < 1:
        out.append(f"validation_every must be 1 or more (a number of steps), or empty for no validation loss, "
                   f"not {c.validation_every}")
    if _is_int(c.early_stop_patience) and c.early_stop_patience < 0:
        out.append(f"early_stop_patience must be 0 (off) or more, not {c.early_stop_patience}")
    elif _is_int(c.early_stop_patience) and c.early_stop_patience > 0 and c.validation_every is None:
        out.append(f"early_stop_patience {c.early_stop_patience} needs the validation loss: set validation_every "
                   f"too (e.g. --validation-every 50)")
    if _is_int(c.preview_steps) and c.preview_steps > MAX_PREVIEW_STEPS:
        out.append(f"preview_steps must be at most {MAX_PREVIEW_STEPS}, not {c.preview_steps}")
    for name in ("seed", "preview_seed"):
        value = getattr(c, name)
        if _is_int(value) and value < -1:
            out.append(f"{name} must be -1 (random) or a seed of 0 or more, not {value}")
    return out


def _numbers(c: TrainConfig) -> list[str]:
    out = []
    checks = [("adam_beta1", 0, 1, False), ("adam_beta2", 0, 1, False), ("momentum", 0, 1, False),
              ("adam_epsilon", 0, math.inf, True), ("min_snr_gamma", 0, math.inf, False),
              ("noise_offset", 0, math.inf, False), ("preview_cfg_scale", 0, math.inf, False),
              ("nan_guard_lr_factor", 0, 1, True)]
    for name, low, high, exclude_low in checks:
        value = getattr(c, name)
        if not _is_num(value):
            continue
        if not math.isfinite(value) or value < low or (exclude_low and value == low) or value >= high:
            low_text = f"more than {low}" if exclude_low else f"at least {low}"
            out.append(f"{name} must be {low_text} and below {high}, not {value}")
    if _is_num(c.weight_decay) and not 0 <= c.weight_decay < math.inf:
        out.append(f"weight_decay must be 0 or more, not {c.weight_decay}")
    return out


def _choices_and_schedules(c: TrainConfig) -> list[str]:
    out = []
    for name, allowed in (("optimizer", OPTIMIZERS), ("clip_grad_mode", CLIP_MODES), ("precision", PRECISIONS)):
        value = getattr(c, name)
        if value not in allowed:
            out.append(f"{name} {value!r} is not known; choose one of {', '.join(allowed)}")
    missing = missing_optimizers().get(c.optimizer) if isinstance(c.optimizer, str) else None
    if missing:
        out.append(f"optimizer {c.optimizer!r} needs a package that is not installed here; {missing}, or choose "
                   f"adamw")
    max_steps = c.steps if _is_int(c.steps) and c.steps > 0 else 1
    if isinstance(c.learning_rate, str):
        try:
            parse_schedule(c.learning_rate, max_steps)
        except ConfigError as exc:
            out.extend(exc.problems)
    if c.clip_grad_mode in ("value", "norm") and isinstance(c.clip_grad_value, str):
        try:
            parse_schedule(c.clip_grad_value, max_steps, what="clip value")
        except ConfigError as exc:
            out.extend(exc.problems)
    return out


_CHECKS: tuple[Callable[[TrainConfig], list[str]], ...] = (type_problems, _counts, _numbers, _choices_and_schedules)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- saved configs: numbered migrations (OneTrainer's config_version idea) ---------------------------------------

def _migrate_0(d: dict[str, Any]) -> dict[str, Any]:
    """Version 0 used the WebUI's Train-tab names (`learn_rate`, `gradient_step`, `create_image_every`, ...)."""
    renames = {"learn_rate": "learning_rate", "gradient_step": "gradient_accumulation",
               "create_image_every": "preview_every", "save_embedding_every": "save_every",
               "save_hypernetwork_every": "save_every"}
    return {renames.get(k, k): v for k, v in d.items()}


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _migrate_0}


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from saved values, upgrading older versions; unknown keys are a ConfigError."""
    data = dict(d)
    version = data.pop("version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= CONFIG_VERSION:
        raise ConfigError(f"the saved training config has version {version!r}; this program reads versions "
                          f"0 to {CONFIG_VERSION}. Update the program or save the config again")
    for old in range(version, CONFIG_VERSION):
        data = MIGRATIONS[old](data)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"the saved training config has unknown settings: {', '.join(unknown)}; "
                          "remove them or check their spelling")
    return TrainConfig(**data, version=CONFIG_VERSION)
