"""The standalone app's Host: a model picked in the app (loaded lazily), a lock of our own, an output folder."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from finetune_core.data.templates import available_templates
from finetune_core.errors import ConfigError
from finetune_core.formats.kinds import KIND_OF_FOLDER
from finetune_core.jobs import service
from finetune_core.jobs.service import OutputFolders
from finetune_core.model.interface import DiffusionModel
from finetune_core.train.events import Event

log = logging.getLogger(__name__)
T = TypeVar("T")
ARTIFACT_SUFFIXES = (".pt", ".safetensors", ".bin", ".ckpt", ".png", ".webp")


def _default_loader(spec: str) -> DiffusionModel:
    return service.load(spec)


class StandaloneHost:
    """Host for `python -m finetune_core ui`: one model at a time, jobs serialised by a threading.Lock."""

    name = "standalone"

    def __init__(self, output_dir: str | Path, model_spec: str = "tiny-sd1",
                 loader: Callable[[str], DiffusionModel] | None = None,
                 template_dirs: list[Path] | None = None) -> None:
        self.model_spec = model_spec
        self._folders = OutputFolders.standalone(output_dir)
        self._loader = loader or _default_loader
        self._template_dirs = list(template_dirs or [])
        self._model: DiffusionModel | None = None
        self._model_lock = threading.Lock()  # one load at a time
        self._job_lock = threading.Lock()  # one job at a time, like the WebUI's queue_lock

    # --- model --------------------------------------------------------------------------------------------
    def get_model(self) -> DiffusionModel:
        """The picked model, loaded on first use so the app starts fast."""
        with self._model_lock:
            if self._model is None:
                log.info("loading model %s", self.model_spec)
                self._model = self._loader(self.model_spec)
            return self._model

    def load_model(self, spec: str) -> str:
        """Switch to model `spec` now (the Load button); refused while a job runs."""
        if not spec:
            raise ConfigError("the base model is empty; give tiny-sd1, a checkpoint file or a diffusers folder")
        if self._job_lock.locked():
            raise ConfigError("a training job is running; wait for it (or interrupt it) before changing the model")
        with self._model_lock:
            model = self._loader(spec)
            self._model, self.model_spec = model, spec
        return self.model_status()

    def model_family(self) -> str | None:
        model = self._model
        return model.family if model is not None else service.model_family(self.model_spec)

    def model_title(self) -> str:
        return self.model_spec

    def model_status(self) -> str:
        """A line saying which model is picked and whether it is loaded."""
        model = self._model
        if model is None:
            return f"Base model: {self.model_spec} (loads on first use)."
        return (f"Base model: {self.model_spec}: {model.family}, {model.prediction_type}, "
                f"hash {model.identity.shorthash}, on {model.device}.")

    # --- Host protocol ------------------------------------------------------------------------------------
    def model_picker(self) -> StandaloneHost:
        return self

    def aesthetic_folders(self) -> list[Path]:
        return [self.folders().aesthetic_embeddings]

    def default_aesthetic_clip(self) -> str:
        return ""

    def folders(self) -> OutputFolders:
        return self._folders

    def template_dirs(self) -> list[Path]:
        return list(self._template_dirs)

    def run_exclusive(self, job: Callable[[], T]) -> T:
        with self._job_lock:
            return job()

    def on_event(self, event: Event) -> None:
        log.debug("event %s", type(event).__name__)

    def artifacts_written(self, kind: str, paths: list[Path]) -> None:
        log.info("%s written: %s", kind, ", ".join(str(p) for p in paths))

    def list_existing(self, kind: str) -> list[str]:
        """Template file names, or the artefact names in the output folder of `kind`."""
        if kind == "templates":
            return sorted(available_templates(tuple(self._template_dirs)))

        folder = self._folders.for_kind(kind)
        if not folder.is_dir():
            return []
        # NAME.preview.png beside a LoRA is no LoRA; the other folders list every suffix (as before the kinds table)
        suffixes = KIND_OF_FOLDER[kind].suffixes if kind == "loras" else ARTIFACT_SUFFIXES
        return sorted({p.stem for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes})

