"""Exponential moving averages of parameter groups, kept by the loop for any method that asks (`ParamGroup.ema`).

After every good optimizer step: avg = d * avg + (1 - d) * param. Options cover both methods that use it:
- `replace_every` N > 0: every N steps the average replaces the live parameters (DreamArtist's "EMA replace steps");
- `warmup`: d after n updates is min(decay, (1 + n) / (10 + n)), LDM's `LitEma`, so early averages are not dominated
  by the starting weights (DreamBooth);
- `on_cpu`: the average lives in RAM (saves device memory the size of the weights, at a copy per step);
- `saved`: the artefact is written from the average instead of the live weights (DreamBooth's EMA checkpoint).
The averages are float32 and part of the trainable state: the resume state and the NaN guard's snapshots keep
them, so a resumed run is exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from finetune_core.errors import ArtifactError
from finetune_core.train.param_group import Averaging, ParamGroup


@dataclass
class _Averaged:
    how: Averaging
    params: list[torch.Tensor]
    averages: list[torch.Tensor]


class ParameterAverages:
    """The averages of the groups that ask for one; empty (and free) when none does."""

    def __init__(self, groups: Sequence[ParamGroup]) -> None:
        self._groups = [_Averaged(g.ema, list(g.params),
                                  [p.detach().to("cpu" if g.ema.on_cpu else p.device, torch.float32, copy=True)
                                   for p in g.params]) for g in groups if g.ema is not None]

    def tensors(self) -> list[torch.Tensor]:
        """The live average tensors (for snapshots: restoring them in place restores the averages)."""
        return [a for group in self._groups for a in group.averages]

    def host_tensors(self) -> list[torch.Tensor]:
        """The averages kept in RAM (`on_cpu`), off the device's memory."""
        return [a for group in self._groups if group.how.on_cpu for a in group.averages]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the parameters in after good step number `step` (1-based); replace them every `replace_every`."""
        for group in self._groups:
            weight = 1.0 - group.how.decay_at(step)
            for param, average in zip(group.params, group.averages):
                average.lerp_(param.detach().to(average.device, torch.float32), weight)
                if group.how.replace_every and step % group.how.replace_every == 0:
                    param.copy_(average)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """While active, the parameters of groups with `saved` hold their averages (storage exchanged, no copy)."""
        swapped = [(p, a) for g in self._groups if g.how.saved for p, a in zip(g.params, g.averages)]
        saved = [p.data for p, _ in swapped]
        for param, average in swapped:
            param.data = average
        try:
            yield
        finally:
            for (param, _), data in zip(swapped, saved):
                param.data = data

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
