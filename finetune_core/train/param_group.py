"""A group of parameters that share a learning rate, and how the loop averages one (`Averaging`, see `train.ema`):
what a method's `trainable_parameters` returns to the loop, the optimizer and the moving averages."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Averaging:
    """How a group is averaged (see the module docstring)."""

    decay: float
    replace_every: int = 0
    warmup: bool = False
    on_cpu: bool = False
    saved: bool = False

    def decay_at(self, updates: int) -> float:
        """The decay of update number `updates` (1-based)."""
        return min(self.decay, (1 + updates) / (10 + updates)) if self.warmup else self.decay


@dataclass
class ParamGroup:
    """Parameters that share a learning rate: the schedule's rate times `lr_scale` (kept at every schedule change).

    learning_rate: the group's own rate or schedule, in the run's learning-rate syntax ("2e-6:400, 1e-6"), used
        instead of the run's; when it runs out, the group stops training while the others go on.
    stop_step: the group trains only for steps before this one (0: until the end); from then on it is frozen
        (no gradient is computed for it, the optimizer leaves it alone), e.g. a text encoder for the first N steps.
    clip_norm: above 0, the group's gradient norm is clipped to it at every step (after the run's own clipping).
    ema: the loop keeps an exponential moving average of the group (`Averaging`, kept by `train.ema`; None: no average).
    """

    name: str
    params: list[torch.Tensor]
    lr_scale: float = 1.0
    weight_decay: float | None = None  # None: the optimizer's setting
    learning_rate: str = ""
    stop_step: int = 0
    clip_norm: float = 0.0
    ema: Averaging | None = None
