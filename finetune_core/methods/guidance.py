"""The guidance scale DreamArtist trains under: a constant, or a range swept over the timestep.

Text forms (methods.md §4.1): `"3.0"` (constant) or `"lo-hi"` optionally followed by `":ln"`, `":cos"` or `":cos2"`.
With r = t / (T - 1), the scale is lo + (hi - lo) * f(r) with f = r (ln), cos((r - 1) * pi / 2) (cos) or
1 - cos(r * pi / 2) (cos2). The original extension also passed any other text after the colon to Python's `eval`;
here only these forms parse, and anything else is a ConfigError that says which forms exist.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from finetune_core.errors import ConfigError

CURVES = ("ln", "cos", "cos2")
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_FORM = re.compile(rf"^\s*({_NUMBER})\s*(?:-\s*({_NUMBER})\s*)?(?::\s*([A-Za-z0-9_]+)\s*)?$")
_FORMS = ("a number such as '3.0', or a range 'low-high' swept over the timestep, optionally followed by "
          "':ln' (linear, the default), ':cos' or ':cos2', such as '1.5-3.0:cos'; other expressions are not "
          "evaluated")


@dataclass(frozen=True)
class GuidanceScale:
    """s(t) = low + (high - low) * curve(t / (T - 1)); constant when low == high."""

    low: float
    high: float
    curve: str = "ln"

    @property
    def constant(self) -> bool:
        return self.low == self.high

    @property
    def is_one(self) -> bool:
        """A scale of exactly 1 everywhere: the guided prediction is the positive one alone."""
        return self.constant and self.low == 1.0

    def at(self, timesteps: torch.Tensor, num_timesteps: int) -> torch.Tensor:
        """The scale of each sample, (B,) float32, on the timesteps' device."""
        if self.constant:
            return torch.full(timesteps.shape, self.low, dtype=torch.float32, device=timesteps.device)
        r = timesteps.float() / max(1, num_timesteps - 1)
        if self.curve == "cos":
            r = torch.cos((r - 1) * math.pi / 2)
        elif self.curve == "cos2":
            r = 1 - torch.cos(r * math.pi / 2)
        return self.low + (self.high - self.low) * r


def parse_guidance(text: object) -> GuidanceScale:
    """Parse the CFG-scale setting; ConfigError naming the accepted forms for anything else."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = repr(float(text))
    if not isinstance(text, str):
        raise ConfigError(f"the CFG scale {text!r} must be text: {_FORMS}")
    match = _FORM.match(text)
    if match is None:
        raise ConfigError(f"the CFG scale {text!r} is not understood; write {_FORMS}")
    low = float(match.group(1))
    high = float(match.group(2)) if match.group(2) is not None else low
    curve = match.group(3) or "ln"
    if curve not in CURVES:
        raise ConfigError(f"the CFG scale {text!r} names the curve {curve!r}; use one of {', '.join(CURVES)} "
                          f"(other expressions are not evaluated)")
    if low <= 0 or high <= 0 or not math.isfinite(low) or not math.isfinite(high):
        raise ConfigError(f"the CFG scale {text!r} must be above 0 (3 to 5 is usual)")
    return GuidanceScale(low, high, curve)


def guide(negative: torch.Tensor, positive: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance of two model outputs: negative + s * (positive - negative), s per sample."""
    s = scale.to(positive.device, torch.float32).reshape(-1, *([1] * (positive.ndim - 1)))
    return negative.float() + s * (positive.float() - negative.float())
