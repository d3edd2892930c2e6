"""Exponential moving averages of parameter groups (`ParamGroup.ema_decay`), kept by the loop for any method.

After every good optimizer step: avg = decay * avg + (1 - decay) * param; with `ema_every` N > 0 the average then
replaces the live parameters every N steps (DreamArtist's "EMA replace steps"). The averages are part of the
trainable state: the resume state and the NaN guard's snapshots keep them, so a resumed run is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from finetune_core.errors import ArtifactError

if TYPE_CHECKING:  # train sits below methods: the protocol types are for hints only
    from finetune_core.train.method import ParamGroup


@dataclass
class _Averaged:
    decay: float
    every: int
    params: list[torch.Tensor]
    averages: list[torch.Tensor]


class ParameterAverages:
    """The averages of the groups that ask for one; empty (and free) when none does."""

    def __init__(self, groups: Sequence[ParamGroup]) -> None:
        self._groups = [_Averaged(g.ema_decay, g.ema_every, list(g.params),
                                  [p.detach().clone() for p in g.params]) for g in groups if g.ema_decay < 1.0]

    def tensors(self) -> list[torch.Tensor]:
        """The live average tensors (for snapshots: restoring them in place restores the averages)."""
        return [a for group in self._groups for a in group.averages]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the parameters in after optimizer step number `step` (1-based); replace them every `every` steps."""
        for group in self._groups:
            for param, average in zip(group.params, group.averages):
                average.mul_(group.decay).add_(param.detach().to(average.dtype), alpha=1.0 - group.decay)
                if group.every and step % group.every == 0:
                    param.copy_(average)

    def state_dict(self) -> list[torch.Tensor]:
        return [a.detach().to("cpu", copy=True) for a in self.tensors()]

    @torch.no_grad()
    def load_state_dict(self, saved: Sequence[torch.Tensor]) -> None:
        mine = self.tensors()
        if len(saved) != len(mine) or any(a.shape != s.shape for a, s in zip(mine, saved)):
            raise ArtifactError("the resume state's moving averages do not match this run's settings (EMA turned "
                                "on or off, or other vectors); resume with the settings the run started with")
        for average, value in zip(mine, saved):
            average.copy_(value.to(average.device, average.dtype))
