"""Training progress on a console: a tqdm bar (step, loss, learning rate, speed, ETA). The command line shows it,
and the WebUI's console while a job of the tab runs, as the WebUI's own training does."""

from __future__ import annotations

import math
import sys
from typing import Any

from finetune_core.train import events


class ConsoleProgress:
    """Loop events as a tqdm bar on `stream`; with `echo`, warnings and previews print above it (the WebUI logs
    warnings itself). The bar closes when the run finishes or fails, or on exit from the `with` block."""

    def __init__(self, stream: Any = None, desc: str | None = None, echo: bool = True) -> None:
        from tqdm import tqdm

        self.tqdm = tqdm
        self.stream = stream or sys.stderr
        self.desc = desc
        self.echo = echo
        self.bar: Any = None
        self.phase_bar: Any = None  # work before step 1 (class images, latents): its own bar, count and ETA
        self.phase = ""

    def __enter__(self) -> ConsoleProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._close_phase()
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _close_phase(self) -> None:
        if self.phase_bar is not None:
            self.phase_bar.close()
            self.phase_bar = None
            self.phase = ""

    def _on_phase(self, event: events.Phase) -> None:
        if event.what != self.phase or self.phase_bar is None:
            self._close_phase()
            self.phase = event.what
            self.phase_bar = self.tqdm(total=event.total, file=self.stream, unit="item", dynamic_ncols=True,
                                       desc=f"{self.desc + ': ' if self.desc else ''}{event.what}", mininterval=0.2)
        self.phase_bar.update(event.done - self.phase_bar.n)

    def __call__(self, event: Any) -> None:
        if isinstance(event, events.Phase):
            self._on_phase(event)
        elif isinstance(event, events.Started):
            self.close()
            self.bar = self.tqdm(total=event.total_steps, initial=event.start_step, file=self.stream, unit="step",
                                 desc=self.desc, dynamic_ncols=True, mininterval=0.2)
        elif isinstance(event, events.StepEvent) and self.bar is not None:
            self.bar.set_postfix_str(f"loss {event.loss:.4f} lr {event.learning_rate:.2g}", refresh=False)
            self.bar.update(event.step - self.bar.n)
        elif isinstance(event, (events.Finished, events.Failed)):
            self.close()
        elif isinstance(event, events.ArtifactChecked) and self.echo:
            self.tqdm.write(f"checked {event.line}", file=self.stream)
        elif isinstance(event, events.Warning_) and self.echo:
            self.tqdm.write(f"{'note' if event.note else 'warning'}: {event.message}", file=self.stream)
        elif isinstance(event, events.ValidationEvent):  # the WebUI's console shows it too: it is not logged
            self.tqdm.write(f"validation loss at step {event.step}: {event.loss:.6g} (best {event.best_loss:.6g} at "
                            f"step {event.best_step})", file=self.stream)
        elif isinstance(event, events.PreviewEvent) and self.echo:
            self.tqdm.write(f"preview at step {event.step}: {event.path}", file=self.stream)


def format_seconds(seconds: float | None) -> str:
    """'1h 02m', '3m 05s', '12s' or '-'."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"
