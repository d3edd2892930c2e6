"""Value types of a training job: what to train, where the output goes, the loop position, the result."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_core.data.data_batch import TrainingData
from finetune_core.model.interface import DiffusionModel
from finetune_core.train.guard import GuardState
from finetune_core.train.run_folder import RunFolder
from finetune_core.train.train_config import TrainConfig

if TYPE_CHECKING:  # train sits below methods: the protocol is for hints only
    from finetune_core.train.method import Method


@dataclass(frozen=True)
class OutputSpec:
    """Where the final artefact goes: `final_dir`, file stem `name`, and whether an existing file may be replaced."""

    final_dir: Path
    name: str
    overwrite: bool = False
    settings: Mapping[str, Any] = field(default_factory=dict)  # method settings stamped into the artefact


@dataclass(frozen=True)
class TrainResult:
    step: int
    interrupted: bool
    artifacts: tuple[Path, ...]
    run_dir: Path
    seed: int


@dataclass
class Counters:
    """Loop position, saved with every resume state. attempt counts tried steps (skipped ones too): it keys
    the data order and the noise, so a skipped or rolled-back step never redraws the same batch."""

    step: int
    attempt: int
    seed: int
    guard: GuardState = field(default_factory=GuardState)
    final_written: bool = False
    csv_losses: list[float] = field(default_factory=list)
    # the validation loss's early stop: the lowest loss so far, its step, and evaluations since (issue 23)
    best_validation: float | None = None
    best_validation_step: int = 0
    evaluations_since_best: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "attempt": self.attempt, "seed": self.seed, "final_written": self.final_written,
                "csv_losses": list(self.csv_losses), "bad_streak": self.guard.bad_streak,
                "rollbacks": self.guard.rollbacks, "lr_factor": self.guard.lr_factor,
                "best_validation": self.best_validation, "best_validation_step": self.best_validation_step,
                "evaluations_since_best": self.evaluations_since_best}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Counters:
        guard = GuardState(int(d["bad_streak"]), int(d["rollbacks"]), float(d["lr_factor"]))
        best = d.get("best_validation")  # absent in states saved before the validation loss
        return Counters(int(d["step"]), int(d["attempt"]), int(d["seed"]), guard, bool(d["final_written"]),
                        [float(x) for x in d["csv_losses"]], None if best is None else float(best),
                        int(d.get("best_validation_step", 0)), int(d.get("evaluations_since_best", 0)))


@dataclass
class TrainJob:
    """What to train: the model, the method, the data, the settings, the run folder and the output."""

    model: DiffusionModel
    method: Method
    data: TrainingData
    config: TrainConfig
    run: RunFolder
    output: OutputSpec
    validation: TrainingData | None = None  # the validation set (None: the training images, when asked for)
