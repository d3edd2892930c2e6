"""What a method module implements: the `Method` the loop trains (defined in `finetune_core.train.method`) and the
`MethodSpec` that hosts and the job API see (forms, defaults, folders, hooks); plus shared defaults."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

from finetune_core.data.data_batch import TrainingData
from finetune_core.data.dataset import ImageDataset
from finetune_core.data.dataset_config import DatasetConfig
from finetune_core.errors import ConfigError
from finetune_core.model.interface import DiffusionModel
from finetune_core.train.memory import MemoryNeeds
from finetune_core.train.method import (
    ArtifactMeta,
    InferenceExtras,
    Method,
    PrepareContext,
    StatePolicy,
)
from finetune_core.train.param_group import ParamGroup

__all__ = ["ArtifactMeta", "ArtifactMethod", "InferenceExtras", "Method", "MethodConfig", "MethodSpec", "ParamGroup",
           "PrepareContext", "StatePolicy"]


class MethodConfig(Protocol):
    """A method's settings dataclass (a `MethodSpec.config_type` or `create_type` instance)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    def validate(self) -> None: ...


class MethodSpec(ABC):
    """One method as hosts and the job API see it: its forms, defaults, where its files go, and its hooks.

    Each method module declares one subclass and one instance of it (`METHOD`); the registry lists those. The
    optional hooks have their defaults here (STYLE.md §27), so a method only writes what it really does.
    """

    key: ClassVar[str]  # the registry key: the Method's own `name`
    label: ClassVar[str]
    description: ClassVar[str]
    config_type: ClassVar[type]  # the settings dataclass of a run
    create_type: ClassVar[type | None] = None  # the settings of the separate create step; None: there is none
    output_kind: ClassVar[str]  # a field of OutputFolders: "embeddings", "hypernetworks", "checkpoints", "loras", ...
    log_folder: ClassVar[str]  # the WebUI's log directory name for this method
    data_defaults: ClassVar[Mapping[str, Any]] = {}  # overrides of DatasetConfig defaults
    train_defaults: ClassVar[Mapping[str, Any]] = {}  # overrides of TrainConfig defaults
    usual_max_lr: ClassVar[float] = 0.0  # a learning rate above this gets a warning (the usual rates are far lower)
    needs_name_in_prompt: ClassVar[bool] = False  # the trained word must appear in the prompt template
    name_help: ClassVar[str] = "The file name of the artefact."  # what the name is for this method (the tab, --name)

    @abstractmethod
    def build(self, model: DiffusionModel, name: str, config: Any, directory: Path, seed: int) -> Method:
        """The method ready to train (reads the file to continue from, in `directory`, the artefacts' folder)."""

    @abstractmethod
    def memory(self, model: DiffusionModel, config: Any) -> MemoryNeeds:
        """What the method adds to the model in memory (for the estimate before Train)."""

    def create(self, model: DiffusionModel, name: str, config: Any, directory: Path, overwrite: bool) -> list[Path]:
        """Write a new, untrained artefact (a `create_type` settings object); returns the paths written."""
        raise ConfigError(f"{self.label} has no separate create step; train it directly")

    def data(self, config: Any, data: DatasetConfig, name: str) -> TrainingData:
        """The training data of a run: by default the dataset folder, `[name]` = `name`."""
        return ImageDataset(data, placeholder=name)

    def resolve(self, config: Any, data: DatasetConfig, method_folder: Path) -> Any:
        """The method settings with folder defaults filled in (`method_folder`: the method's own folder in the logs);
        run when a request is planned (no model yet), so it also refuses unusable folders then. Unchanged by default."""
        return config

    def dataset_needs(self, config: Any) -> dict[str, Any]:
        """Dataset settings the method cannot work without (DreamArtist's reconstruction: the pixels). None by
        default."""
        return {}

    def pairs_class_images(self, config: Any) -> bool:
        """Each training image goes through the UNet with a class image (prior preservation). False by default."""
        return False

    def trains_text_encoders(self, config: Any) -> bool:
        """The run trains the text encoders' own weights, and the `train_text_encoder` setting turns that off (the
        memory plan offers it). False by default."""
        return False

    def continue_from(self, config: Any) -> str:
        """The existing artefact a run continues from (a path or a name in the output folder); "" starts anew."""
        return ""

    def check_request(self, config: Any, name: str, folder: Path, overwrite: bool) -> None:  # noqa: B027 - optional
        """The method's own checks of a train or create request that need files but no model (DreamArtist's second
        file and its discriminator file). Nothing by default."""


class ArtifactMethod(Method):
    """A method training an artefact file object (`name`, `step`): `[name]` is its name; it starts at its step."""

    file: Any

    @property
    def placeholder(self) -> str:
        return str(self.file.name)

    @property
    def start_step(self) -> int:
        return int(self.file.step or 0)
