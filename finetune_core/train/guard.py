"""The NaN guard: skip non-finite steps, roll back to the last good state, lower the rate, give up with advice."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from finetune_core.errors import TrainingDiverged


@dataclass
class GuardState:
    """What the guard must remember across a resume."""

    bad_streak: int = 0
    rollbacks: int = 0
    lr_factor: float = 1.0


@dataclass(frozen=True)
class Snapshot:
    """A good state kept in memory (CPU): trainable tensors, optimizer state, grad-scaler state and step."""

    step: int
    params: list[torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any]


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return copy.deepcopy(value)


class NanGuard:
    """Counts bad steps in a row; after `bad_steps` of them rolls back and multiplies the lr by `lr_factor`."""

    def __init__(self, state: GuardState, bad_steps: int, max_rollbacks: int, lr_factor: float,
                 snapshots: bool = True) -> None:
        self.state = state
        self.bad_steps = bad_steps
        self.max_rollbacks = max_rollbacks if snapshots else 0
        self.lr_factor = lr_factor
        self.snapshots = snapshots  # False: the method's state is too large to copy (a full fine-tune)
        self.snapshot: Snapshot | None = None

    def take_snapshot(self, step: int, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                      scaler: Any) -> None:
        """Remember the current state as the last good one (nothing when snapshots are off)."""
        if not self.snapshots:
            return
        self.snapshot = Snapshot(step, [p.detach().to("cpu", copy=True) for p in params],
                                 _to_cpu(optimizer.state_dict()), _to_cpu(scaler.state_dict()))

    def record_good(self) -> None:
        self.state.bad_streak = 0

    def record_bad(self) -> bool:
        """Count a skipped step; True when it is time to roll back. Raises TrainingDiverged when out of rollbacks."""
        self.state.bad_streak += 1
        if self.state.bad_streak < self.bad_steps:
            return False
        if not self.snapshots:
            raise TrainingDiverged(
                f"training diverged: the loss or the gradients were not finite for {self.state.bad_streak} steps in "
                "a row (this method keeps no in-memory copy to roll back to; the last saved file is intact). Lower "
                "the learning rate, and train in fp32 or bf16 instead of fp16; check the dataset for broken images")
        if self.state.rollbacks >= self.max_rollbacks or self.snapshot is None:
            raise TrainingDiverged(
                f"training diverged: the loss or the gradients were not finite for {self.state.bad_streak} steps in "
                f"a row, even after {self.state.rollbacks} rollbacks that each lowered the learning rate "
                f"(now x{self.state.lr_factor:g}). Lower the learning rate, and train in fp32 or bf16 instead of "
                "fp16; check the dataset for broken images")
        return True

    def rollback(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer, scaler: Any) -> int:
        """Restore the last good state in place, lower the lr factor; returns the step to continue from."""
        snap = self.snapshot
        if snap is None:  # record_bad never asks for a rollback without a snapshot
            raise TrainingDiverged("training diverged before any good state was kept; lower the learning rate")
        with torch.no_grad():
            for param, saved in zip(params, snap.params):
                param.copy_(saved.to(param.device))
        optimizer.load_state_dict(copy.deepcopy(snap.optimizer))
        if snap.scaler:
            scaler.load_state_dict(dict(snap.scaler))
        self.state.rollbacks += 1
        self.state.bad_streak = 0
        self.state.lr_factor *= self.lr_factor
        return snap.step
