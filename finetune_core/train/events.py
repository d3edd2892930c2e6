"""Typed events the loop emits to one `on_event` callable (k-diffusion's `callback` idea).

Hosts turn them into `shared.state` updates (WebUI), a Gradio display (standalone) or a progress line (CLI).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Started:
    run_dir: Path
    total_steps: int
    start_step: int  # > 0 when resuming


@dataclass(frozen=True)
class Phase:
    """Progress of work before step 1: "latents" (encoding the images), or a method's own ("class images")."""

    what: str
    done: int
    total: int


@dataclass(frozen=True)
class StepEvent:
    step: int  # optimizer steps done so far (1-based after the first step)
    total_steps: int
    loss: float
    learning_rate: float
    epoch: int
    seconds_per_step: float
    eta_seconds: float
    prompt: str = ""


@dataclass(frozen=True)
class PreviewEvent:
    step: int
    path: Path
    image: Any  # PIL.Image.Image
    prompt: str


@dataclass(frozen=True)
class ArtifactSaved:
    step: int
    paths: tuple[Path, ...]
    final: bool  # True for the file(s) in the output folder, False for intermediate copies


@dataclass(frozen=True)
class ValidationEvent:
    """The validation loss at `step` (fixed timesteps and noise), and the lowest so far with its step."""

    step: int
    loss: float
    best_loss: float
    best_step: int


@dataclass(frozen=True)
class ArtifactChecked:
    """The host's own loader took a file just saved: "N of N modules applied" (a LoRA), the unmatched keys."""

    step: int
    path: Path
    loader: str
    applied: int
    total: int
    unmatched: tuple[str, ...] = ()

    @property
    def line(self) -> str:
        return f"{self.path.name}: {self.applied} of {self.total} modules applied by {self.loader}"


@dataclass(frozen=True)
class Warning_:
    message: str
    note: bool = False  # a change the user asked for (a resume's new last step), not a problem


@dataclass(frozen=True)
class Finished:
    step: int
    interrupted: bool
    artifacts: tuple[Path, ...]
    run_dir: Path


@dataclass(frozen=True)
class Failed:
    message: str
    step: int
    error: BaseException | None = field(default=None, compare=False)


Event = (Started | Phase | StepEvent | PreviewEvent | ArtifactSaved | ArtifactChecked | ValidationEvent | Warning_ |
         Finished | Failed)
EventSink = Callable[[Event], None]


def ignore_events(_event: Event) -> None:
    """An event sink that drops everything (library use and tests)."""
