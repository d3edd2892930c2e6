"""An exponential moving average of trained weights (Polyak averaging), with LDM's warm-up: the decay after n
updates is min(decay, (1 + n) / (10 + n)) (`ldm.modules.ema.LitEma`), so early averages are not dominated by the
starting weights. The averages are float32 and may live on another device than the weights (the CPU, to save
device memory at the cost of a copy per update).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch


class ParameterEMA:
    """Averages of `params` (same order), updated by `update(params)` after each optimizer step."""

    def __init__(self, params: list[torch.Tensor], decay: float, device: torch.device | str | None = None) -> None:
        self.decay = decay
        self.updates = 0
        self.averages = [p.detach().to(device or p.device, torch.float32, copy=True) for p in params]

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, params: list[torch.Tensor]) -> None:
        """average ← decay · average + (1 − decay) · weight, for every weight."""
        weight = 1.0 - self.current_decay()
        for average, param in zip(self.averages, params, strict=True):
            average.lerp_(param.detach().to(average.device, torch.float32), weight)
        self.updates += 1

    @contextmanager
    def swapped_in(self, params: list[torch.Tensor]) -> Iterator[None]:
        """While active, `params` hold the averages (their storage is exchanged, nothing is copied)."""
        saved = [p.data for p in params]
        for param, average in zip(params, self.averages, strict=True):
            param.data = average
        try:
            yield
        finally:
            for param, data in zip(params, saved):
                param.data = data

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"average.{i}": a.detach().cpu() for i, a in enumerate(self.averages)}
        state["updates"] = torch.tensor(self.updates)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, average in enumerate(self.averages):
                average.copy_(state[f"average.{i}"])
        self.updates = int(state["updates"])
