"""What a host (the WebUI, or the standalone app) gives the shared tab and job runner."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from finetune_core.jobs.service import OutputFolders
from finetune_core.model.interface import DiffusionModel
from finetune_core.train.events import Event

T = TypeVar("T")


class ModelPicker(Protocol):
    """A host whose tab picks the base model itself (the standalone app's Base model row)."""

    model_spec: str  # what is picked: tiny-sd1, a checkpoint file or a diffusers folder

    def load_model(self, spec: str) -> str:
        """Switch to model `spec` now (the Load button); the line to show."""
        ...

    def model_status(self) -> str:
        """A line saying which model is picked and whether it is loaded."""
        ...


class Host(Protocol):
    """The environment a job runs in. The tab, the REST routes and the job runner only talk to this."""

    name: str  # "webui" or "standalone"

    def get_model(self) -> DiffusionModel:
        """The loaded model (WebUI: `shared.sd_model` wrapped; standalone: the model picked in the app)."""
        ...

    def model_family(self) -> str | None:
        """The family of the model a job would train on, where known without loading one (a request is checked
        against it: a file to continue from must be of it); None: checked once the model loads."""
        ...

    def model_title(self) -> str:
        """The checkpoint a job started now would train on, as the user knows it (WebUI: the loaded checkpoint's
        title; standalone: the picked model)."""
        ...

    def model_picker(self) -> ModelPicker | None:
        """What the tab's Base model row drives (standalone: the host itself); None where the host picks the model
        (the WebUI's own checkpoint dropdown)."""
        ...

    def folders(self) -> OutputFolders: ...

    def aesthetic_folders(self) -> list[Path]:
        """Where aesthetic embeddings are listed (WebUI: models/aesthetic_embeddings and every extension's, the
        original extension's included; standalone: its own output folder's)."""
        ...

    def default_aesthetic_clip(self) -> str:
        """The CLIP model an Aesthetic Gradients create request uses when it names none (WebUI: Settings ->
        Fine-tune), or "" (the request must name one)."""
        ...

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
