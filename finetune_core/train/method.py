"""The Method base class the loop trains: what trains, the loss, and the artefact. Nothing else (no devices, no
files outside `formats/`, no UI). It lives in train/ because the loop defines what it needs; methods/ implements it.

A method overrides the abstract members; every other hook has a typed default here, so the loop calls hooks
directly and a new method only writes what it really does.
"""

from __future__ import annotations

import glob
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune_core.data.summary import DatasetSummary
from finetune_core.model.interface import (
    ContextTransform,
    DiffusionModel,
    ModelIdentity,
    NetworkCheck,
    SampleRequest,
    TrainableEmbedding,
    WeightAdapter,
)
from finetune_core.train.param_group import ParamGroup
from finetune_core.train.train_batch import TrainBatch


@dataclass(frozen=True)
class ArtifactMeta:
    """What an artefact records about how it was made."""

    name: str
    step: int
    model: ModelIdentity
    family: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    dataset: DatasetSummary | None = None  # the training set (None when an artefact is written without one)


@dataclass
class InferenceExtras:
    """What a method adds to sampling (previews): embeddings to splice in, an attention context transform, and
    weight adapters by layer name (they replace the training set while the preview samples)."""

    embeddings: dict[str, TrainableEmbedding] = field(default_factory=dict)
    context_transform: ContextTransform | None = None
    negative_prompt_suffix: str = ""
    adapters: dict[str, WeightAdapter] = field(default_factory=dict)


@dataclass(frozen=True)
class StatePolicy:
    """How much of the trainable state the loop may copy, per method.

    rollback_snapshots: keep in-memory CPU copies (weights and optimizer state) for the NaN guard's rollback; a full
        fine-tune cannot copy every weight plus Adam every 100 steps, so without it repeated bad steps stop the run
        with advice instead (the last saved artefact is intact).
    resume_state: write the trainable state and the optimizer into the run folder at every save, for exact resume.
    """

    rollback_snapshots: bool = True
    resume_state: bool = True


@dataclass
class PrepareContext:
    """What a method's preparation phase (before step 1) may use: the model, the host's sampler, a folder of its
    own in the run, progress reporting and the interrupt flag (checked by `progress`)."""

    model: DiffusionModel
    run_dir: Path
    sample: Callable[[SampleRequest], list[Any]]
    progress: Callable[[str, int, int], None]  # (what, done, total); raises when the job was interrupted
    seed: int = 0


class Method(ABC):
    """One training method. Instances hold the trainable state (an embedding, a hypernetwork, ...)."""

    name: str  # registry key, e.g. "textual-inversion"
    caches_text: bool  # True when prompts can be encoded once without gradients (frozen text encoders)
    trains: tuple[str, ...] = ()  # model modules whose own weights train ("unet", "text_encoder", ...)
    # True when `loss` decodes latents with gradients (a reconstruction loss): with gradient checkpointing on, the
    # loop then asks the model's training session to checkpoint the VAE decoder too.
    decodes_latents: bool = False
    state_policy: StatePolicy = StatePolicy()

    @property
    @abstractmethod
    def placeholder(self) -> str:
        """What `[name]` in a prompt template becomes."""

    @property
    @abstractmethod
    def start_step(self) -> int:
        """The step the trainable state is at (continuing an existing artefact starts from its step)."""

    @abstractmethod
    def trainable_parameters(self, model: DiffusionModel) -> list[ParamGroup]: ...

    @abstractmethod
    def loss(self, model: DiffusionModel, batch: TrainBatch) -> torch.Tensor: ...

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable state, for rollback and exact resume."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...

    @abstractmethod
    def write_artifact(self, directory: Path, stem: str, meta: ArtifactMeta, overwrite: bool) -> list[Path]:
        """Write the artefact file(s) into `directory` named from `stem`; returns the paths written."""

    # --- hooks with defaults ----------------------------------------------------------------------------------
    def check(self, model: DiffusionModel) -> list[str]:
        """Warnings about the method's fit to the loaded model; raise ModelMismatchError when it cannot work."""
        return []

    def prepare(self, context: PrepareContext) -> None:  # noqa: B027 - an optional hook, empty by default
        """Work before step 1 that needs the model (DreamBooth's class images). Nothing by default."""

    def training_context(self, model: DiffusionModel) -> AbstractContextManager[Any]:
        """Entered around all the steps, and their backward passes (e.g. the hypernetwork's attention hook)."""
        return nullcontext()

    def after_step(self, model: DiffusionModel) -> None:  # noqa: B027 - an optional hook, empty by default
        """Constraints applied after each optimizer step (e.g. restoring frozen rows). Nothing by default."""

    def inference_extras(self) -> InferenceExtras:
        """Embeddings and hooks to apply when sampling previews."""
        return InferenceExtras()

    def artifact_paths(self, directory: Path, stem: str) -> list[Path]:
        """The files a final write would replace (the overwrite check): by default any `<stem>.*` there."""
        return sorted(p for p in Path(directory).glob(glob.escape(stem) + ".*") if p.is_file())

    def preview_artifact(self, image: Any, directory: Path, stem: str, meta: ArtifactMeta) -> list[Path]:
        """Files made from a preview image (the WebUI's PNG that carries an embedding). None by default."""
        return []

    def optimizer_sidecar(self, artifact: Path, optimizer: torch.optim.Optimizer, optimizer_name: str) -> Path | None:
        """The WebUI's `<file>.pt.optim` for `artifact`, when the WebUI can use it; None by default."""
        return None

    def check_artifacts(self, model: DiffusionModel, paths: list[Path]) -> list[tuple[Path, NetworkCheck]]:
        """The host's own loader's view of files just written (a LoRA: how many modules it applies). None by
        default."""
        return []
