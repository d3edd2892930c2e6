"""What a host (the WebUI, or the standalone app) gives the shared tab and job runner."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from finetune_core.jobs.service import OutputFolders
from finetune_core.model.interface import DiffusionModel
from finetune_core.train.events import Event

T = TypeVar("T")


class Host(Protocol):
    """The environment a job runs in. The tab, the REST routes and the job runner only talk to this."""

    name: str  # "webui" or "standalone"

    def get_model(self) -> DiffusionModel:
        """The loaded model (WebUI: `shared.sd_model` wrapped; standalone: the model picked in the app)."""
        ...

    def folders(self) -> OutputFolders: ...

    def template_dirs(self) -> list[Path]:
        """Extra folders searched for prompt templates (WebUI: `textual_inversion_templates/`)."""
        ...

    def run_exclusive(self, job: Callable[[], T]) -> T:
        """Run `job` holding the host's GPU lock (WebUI: `call_queue.queue_lock`): never overlaps generation.

        A host may also accept a keyword `task_id: str | None` (the WebUI progress id from the Train button's JS);
        the JobRunner passes it only to a `run_exclusive` whose signature has that parameter.
        """
        ...

    def on_event(self, event: Event) -> None:
        """Mirror a loop event into the host's own progress display (WebUI: `shared.state`)."""
        ...

    def artifacts_written(self, kind: str, paths: list[Path]) -> None:
        """Make new files visible without a restart (WebUI: reload embeddings / hypernetworks / checkpoints)."""
        ...

    def list_existing(self, kind: str) -> list[str]:
        """Names for the dropdowns: kind is "embeddings", "hypernetworks", "checkpoints" or "templates"."""
        ...
