"""The WebUI's learning-rate schedule syntax: `"0.005:100, 1e-3:1000, 1e-5"`.

Matches `modules/textual_inversion/learn_schedule.py` (`LearnScheduleIterator`, `LearnRateScheduler`):
each `rate:step` pair means "this rate until step N"; a bare rate, or `rate:-1`, lasts until max steps and ends
the list; a step beyond max steps is cut to max steps and ends the list; training stops when the schedule runs out.
Deliberate differences, all for bad input only: every part is checked (the WebUI ignores what follows a bare
rate, so `"0.1, oops"` passed); `rate:step:x`, negative rates and steps below -1 are errors instead of being
read or skipped silently; and so are a rate of 0 and steps that do not increase (`"0.1:10, 0.05:5"`, `"0.1:0"`),
which the WebUI accepts and then trains nothing with (two pairs ending on the same step are refused too, so the
WebUI's one extra micro-batch then does not arise).
"""

from __future__ import annotations

import math

from finetune_core.errors import ConfigError

Schedule = list[tuple[float, int]]  # (rate, until step) pairs, as `parse_schedule` returns them

_EXAMPLE = ('It should be a number or, for example, "0.005:100, 1e-3:1000, 1e-5" for 0.005 until step 100, '
            '1e-3 until step 1000 and 1e-5 until the last step.')


def parse_schedule(text: str, max_steps: int, what: str = "learning rate") -> list[tuple[float, int]]:
    """Parse a schedule string into (rate, end_step) segments, as the WebUI's `LearnScheduleIterator` does."""
    if not isinstance(text, str):
        raise ConfigError(f"Invalid {what} schedule {text!r}: it must be text. {_EXAMPLE}")
    segments: list[tuple[float, int]] = []
    ended = False
    previous = 0
    for part in text.split(","):
        if not part.strip():
            continue  # the WebUI skips empty parts ("0.1,")
        rate, step = _parse_part(part, text, what)
        bad = f"Invalid {what} schedule {text!r}: the part {part.strip()!r} "
        if rate == 0:
            raise ConfigError(bad + f"has a rate of 0, which changes nothing; use a rate above 0. {_EXAMPLE}")
        if step is not None and step != -1 and step <= previous:
            ends = "ends at step 0, before the first step" if step == 0 else f"ends at step {step}, not after " \
                f"the step {previous} the part before it ends at"
            raise ConfigError(bad + f"{ends}: each part's step must be larger than the one before. {_EXAMPLE}")
        previous = step if step is not None and step > 0 else previous
        if ended:
            continue  # checked above, but the schedule already ended (WebUI: parsing stops here)
        if step is None or step == -1 or step > max_steps:
            segments.append((rate, max_steps))
            ended = True
        else:
            segments.append((rate, step))
    if not segments:
        raise ConfigError(f"Invalid {what} schedule {text!r}: it has no rate. {_EXAMPLE}")
    return segments


def _parse_part(part: str, text: str, what: str) -> tuple[float, int | None]:
    """One `rate` or `rate:step` part; raises ConfigError naming the part."""
    pieces = part.split(":")
    bad = f"Invalid {what} schedule {text!r}: the part {part.strip()!r} "
    if len(pieces) > 2:
        raise ConfigError(bad + f"has more than one ':'. {_EXAMPLE}")
    try:
        rate = float(pieces[0])
    except ValueError:
        raise ConfigError(bad + f"does not start with a number. {_EXAMPLE}") from None
    if not math.isfinite(rate) or rate < 0:
        raise ConfigError(bad + f"has a rate that is negative or not finite. {_EXAMPLE}")
    if len(pieces) == 1:
        return rate, None
    try:
        step = int(pieces[1])  # like the WebUI: "100" is a step, "1e3" and "100.0" are not
    except ValueError:
        raise ConfigError(bad + f"has a step that is not a whole number. {_EXAMPLE}") from None
    if step < -1:
        raise ConfigError(bad + f"has a negative step (only -1, meaning 'until the last step', is allowed). "
                          f"{_EXAMPLE}")
    return rate, step


def rate_at(schedule: list[tuple[float, int]], step: int) -> float | None:
    """The rate for the step that starts after `step` steps are done; None when the schedule has run out.

    Same as the WebUI scheduler stepping through its segments: the first segment whose end lies past `step`.
    """
    for rate, end in schedule:
        if step < end:
            return rate
    return None


def end_step(schedule: list[tuple[float, int]]) -> int:
    """The step at which training stops: where the last segment ends (never beyond max steps)."""
    return max(end for _rate, end in schedule)


def run_length(schedule: list[tuple[float, int]], steps: int) -> int:
    """The step a run stops at: max steps, or the end of the learning-rate schedule when that comes first."""
    return min(steps, end_step(schedule))


def nothing_to_train(step: int, total: int) -> str | None:
    """Why a file continued from at `step` has nothing left to train in a run that stops at `total`, or None."""
    if step <= 0 or step < total:
        return None
    return (f"the file continued from is already at step {step}, and this run stops at step {total} (max steps or "
            f"the end of the learning-rate schedule), so there is nothing to train; raise max steps above {step}, "
            f"or start a new file")


def value_at(schedule: list[tuple[float, int]], step: int) -> float:
    """A schedule value that holds its last rate once it runs out (the WebUI's clip-value schedule)."""
    rate = rate_at(schedule, step)
    return schedule[-1][0] if rate is None else rate
