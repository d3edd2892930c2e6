"""The Method protocol the loop trains: what trains, the loss, and the artefact. Nothing else (no devices, no files,
no UI). It lives in train/ because the loop defines what it needs; methods/ implements it."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from finetune_core.model.interface import ContextTransform, DiffusionModel, ModelIdentity, TrainableEmbedding
from finetune_core.train.batch import TrainBatch


@dataclass
class ParamGroup:
    """Parameters that share a learning rate: the schedule's rate times `lr_scale`."""

    name: str
    params: list[torch.Tensor]
    lr_scale: float = 1.0
    weight_decay: float | None = None  # None: the optimizer's setting


@dataclass(frozen=True)
class ArtifactMeta:
    """What an artefact records about how it was made."""

    name: str
    step: int
    model: ModelIdentity
    family: str
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class InferenceExtras:
    """What a method adds to sampling (previews): embeddings to splice in and an attention context transform."""

    embeddings: dict[str, TrainableEmbedding] = field(default_factory=dict)
    context_transform: ContextTransform | None = None
    negative_prompt_suffix: str = ""


class Method(Protocol):
    """One training method. Instances hold the trainable state (an embedding, a hypernetwork, ...)."""

    name: str  # registry key, e.g. "textual-inversion"
    caches_text: bool  # True when prompts can be encoded once without gradients (frozen text encoders)

    @property
    def placeholder(self) -> str:
        """What `[name]` in a prompt template becomes."""
        ...

    @property
    def start_step(self) -> int:
        """The step the trainable state is at (continuing an existing artefact starts from its step)."""
        ...

    def trainable_parameters(self, model: DiffusionModel) -> list[ParamGroup]: ...

    def loss(self, model: DiffusionModel, batch: TrainBatch) -> torch.Tensor: ...

    def after_step(self, model: DiffusionModel) -> None:
        """Constraints applied after each optimizer step (e.g. restoring frozen rows). Usually nothing."""
        ...

    def training_context(self, model: DiffusionModel) -> AbstractContextManager[None]:
        """Entered around the whole run (e.g. the hypernetwork's attention hook). Usually a nullcontext."""
        ...

    def inference_extras(self) -> InferenceExtras:
        """Embeddings and hooks to apply when sampling previews."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable state, for rollback and exact resume."""
        ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...

    def write_artifact(self, directory: Path, stem: str, meta: ArtifactMeta, overwrite: bool) -> list[Path]:
        """Write the artefact file(s) into `directory` named from `stem`; returns the paths written."""
        ...

    # Optional hooks (looked up with getattr; a method may leave them out):
    #   artifact_paths(directory, stem) -> list[Path]: the files write_artifact would produce (overwrite check).
    #   preview_artifact(image, directory, stem, meta) -> list[Path]: files made from a preview image (the WebUI's
    #     PNG that carries the embedding).
    #   optimizer_sidecar(artifact_path, optimizer, optimizer_name) -> Path: the WebUI's `<file>.pt.optim` (written
    #     when TrainConfig.save_optimizer_state is on).
    #   check(model) -> list[str]: warnings about the method's fit to the loaded model, raised as ModelMismatchError
    #     when it cannot work at all.


class MethodDefaults:
    """The hooks most methods leave empty: inherit this and define only what the method really does."""

    def after_step(self, model: DiffusionModel) -> None:
        """No constraint after a step."""

    def training_context(self, model: DiffusionModel) -> AbstractContextManager[None]:
        return nullcontext()
