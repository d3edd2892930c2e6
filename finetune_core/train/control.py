"""Requests a host sends into a running loop, polled only at step boundaries (OneTrainer's TrainCommands idea)."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from finetune_core.errors import JobBusy


@dataclass
class Control:
    """Thread-safe flags: interrupt (save, then stop), pause, save now, preview now."""

    _interrupt: threading.Event = field(default_factory=threading.Event)
    _resume: threading.Event = field(default_factory=threading.Event)
    save_requested: bool = False
    preview_requested: bool = False
    # pictures asked for while paused (issue 23): (what to sample, its answer), made by the loop's own thread
    _asks: list[tuple[Any, Future]] = field(default_factory=list)
    _asks_lock: threading.Lock = field(default_factory=threading.Lock)

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

    def ask_sample(self, request: Any) -> Future:
        """Ask the paused loop for pictures of `request` (a SampleRequest) with the trained state as it is now; the
        loop makes them between its waits, on its own thread, so nothing interleaves with a step. JobBusy when the
        job is not paused."""
        future: Future = Future()
        with self._asks_lock:
            if not self.paused or self.interrupted:
                raise JobBusy("pictures with the state of a job can be made only while it is paused; press Pause, "
                              "wait for the current step to end, and try again")
            self._asks.append((request, future))
        return future

    def take_asks(self) -> list[tuple[Any, Future]]:
        """The pictures asked for since the last call (the loop answers them)."""
        with self._asks_lock:
            asks, self._asks = self._asks, []
        return asks

    def refuse_asks(self, why: str) -> None:
        """Answer every open ask with JobBusy(`why`) (the job resumed or stopped before making them)."""
        for _request, future in self.take_asks():
            future.set_exception(JobBusy(why))
