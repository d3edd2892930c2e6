"""What a method module implements (defined by the loop in `finetune_core.train.method`), plus shared defaults."""

from typing import Any

from finetune_core.data.dataset import ImageDataset
from finetune_core.data.dataset_config import DatasetConfig
from finetune_core.train.method import (
    ArtifactMeta,
    InferenceExtras,
    Method,
    PrepareContext,
    StatePolicy,
)
from finetune_core.train.param_group import ParamGroup

__all__ = ["ArtifactMeta", "ArtifactMethod", "InferenceExtras", "Method", "ParamGroup", "PrepareContext",
           "StatePolicy", "image_dataset"]


def image_dataset(method_config: Any, data: DatasetConfig, name: str) -> ImageDataset:
    """The training data of most methods (`MethodSpec.data`'s default): the dataset folder, `[name]` = `name`."""
    return ImageDataset(data, placeholder=name)


class ArtifactMethod(Method):
    """A method training an artefact file object (`name`, `step`): `[name]` is its name; it starts at its step."""

    file: Any

    @property
    def placeholder(self) -> str:
        return str(self.file.name)

    @property
    def start_step(self) -> int:
        return int(self.file.step or 0)
