"""The job API every host calls: create, train, lint, inspect. Hosts (CLI, Gradio tab, REST, WebUI) are thin on top.

A host supplies the loaded model and the folders; this module builds the dataset, the method and the loop from plain
settings dicts (what a form, a JSON body or argparse produces), so every host validates and fails the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class OutputFolders:
    """Where artefacts and run logs go; laid out like the WebUI's folders."""

    embeddings: Path
    hypernetworks: Path
    checkpoints: Path
    aesthetic_embeddings: Path
    logs: Path  # run folders: <logs>/<method>/<YYYY-MM-DD>/<name>-<HHMMSS>/

    @classmethod
    def standalone(cls, root: str | Path) -> "OutputFolders":
        """The standalone layout under one output folder (default `./outputs`)."""
        base = Path(root)
        return cls(embeddings=base / "embeddings", hypernetworks=base / "models" / "hypernetworks",
                   checkpoints=base / "models" / "Stable-diffusion",
                   aesthetic_embeddings=base / "models" / "aesthetic_embeddings", logs=base / "runs")

    def for_kind(self, kind: str) -> Path:
        """The folder for an output kind named by a MethodSpec ("embeddings", "hypernetworks", ...)."""
        return {"embeddings": self.embeddings, "hypernetworks": self.hypernetworks, "checkpoints": self.checkpoints,
                "aesthetic_embeddings": self.aesthetic_embeddings}[kind]


@dataclass
class TrainRequest:
    """Everything one training job needs, as plain values (JSON-serialisable).

    method: a key of `finetune_core.methods.METHODS` ("textual-inversion", "hypernetwork", ...).
    name: the artefact name (embedding word / hypernetwork name / checkpoint name).
    method_settings / data_settings / train_settings: field values of the method's Config, `DatasetConfig` and
    `TrainConfig`; missing fields take the method's defaults. `resume_run`: a run folder to continue exactly.
    """

    method: str
    name: str
    method_settings: dict[str, Any] = field(default_factory=dict)
    data_settings: dict[str, Any] = field(default_factory=dict)
    train_settings: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    resume_run: str | None = None


@dataclass
class JobResult:
    """What a finished (or interrupted) job produced."""

    artifacts: list[Path]
    run_dir: Path | None
    step: int
    interrupted: bool
    message: str
