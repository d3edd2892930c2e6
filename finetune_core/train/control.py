"""Requests a host sends into a running loop, polled only at step boundaries (OneTrainer's TrainCommands idea)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class Control:
    """Thread-safe flags: interrupt (save, then stop), pause, save now, preview now."""

    _interrupt: threading.Event = field(default_factory=threading.Event)
    _resume: threading.Event = field(default_factory=threading.Event)
    save_requested: bool = False
    preview_requested: bool = False

    def __post_init__(self) -> None:
        self._resume.set()

    def interrupt(self) -> None:
        self._interrupt.set()
        self._resume.set()  # a paused run must wake up to save and stop

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    def pause(self) -> None:
        self._resume.clear()

    def resume(self) -> None:
        self._resume.set()

    @property
    def paused(self) -> bool:
        return not self._resume.is_set()

    def wait_while_paused(self, timeout: float | None = None) -> None:
        """Block while paused; returns at once when not paused or when interrupted."""
        self._resume.wait(timeout)
