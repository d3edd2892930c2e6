"""The methods, registered explicitly (one line each, like the WebUI Lora extension's `module_types`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_core.methods import dreamartist, hypernetwork, textual_inversion
from finetune_core.methods.base import Method
from finetune_core.model.interface import DiffusionModel
from finetune_core.train.memory import MemoryNeeds

# build(model, name, config, folder of existing artefacts, seed) -> Method
Build = Callable[[DiffusionModel, str, Any, Path, int], Method]
# create(model, name, create config, output folder, overwrite) -> paths written
Create = Callable[[DiffusionModel, str, Any, Path, bool], "list[Path]"]
# memory(model, config) -> what the method adds to the model in memory (for the estimate before Train)
Memory = Callable[[DiffusionModel, Any], MemoryNeeds]


@dataclass(frozen=True)
class MethodSpec:
    """What hosts need to know about a method: its forms, defaults and where its files go."""

    key: str
    label: str
    config_type: type
    create_type: type | None
    output_kind: str  # a field of OutputFolders: "embeddings", "hypernetworks", "checkpoints", "aesthetic_embeddings"
    log_folder: str  # the WebUI's log directory name for this method
    description: str
    build: Build
    create: Create | None
    memory: Memory
    data_defaults: dict[str, Any] = field(default_factory=dict)  # overrides of DatasetConfig defaults
    train_defaults: dict[str, Any] = field(default_factory=dict)  # overrides of TrainConfig defaults


METHODS: dict[str, MethodSpec] = {
    "textual-inversion": MethodSpec(
        "textual-inversion", "Textual Inversion", textual_inversion.TextualInversionConfig,
        textual_inversion.TextualInversionCreate, "embeddings", "textual_inversion",
        "Learn a new word (an embedding) for a subject or style; the model stays unchanged.",
        textual_inversion.build, textual_inversion.create_file, textual_inversion.memory_needs,
        data_defaults={"template": "style_filewords.txt"},
        train_defaults={"learning_rate": "0.005"}),
    "hypernetwork": MethodSpec(
        "hypernetwork", "Hypernetwork", hypernetwork.HypernetworkConfig, hypernetwork.HypernetworkCreate,
        "hypernetworks", "hypernetwork",
        "Small networks on every attention layer's keys and values; good for styles.",
        hypernetwork.build, hypernetwork.create_file, hypernetwork.memory_needs,
        data_defaults={"template": "hypernetwork.txt"},
        train_defaults={"learning_rate": "0.00001"}),
    "dreamartist": MethodSpec(
        "dreamartist", "DreamArtist (APT)", dreamartist.DreamArtistConfig, dreamartist.DreamArtistCreate,
        "embeddings", "dream_artist",
        "A word NAME and its negative NAME-neg learned together under guidance, often from one image; use NAME in "
        "the prompt and NAME-neg in the negative prompt.",
        dreamartist.build, dreamartist.create_file, dreamartist.memory_needs,
        data_defaults={"template": "subject.txt", "attention_masks": True},
        train_defaults={"learning_rate": "0.003", "steps": 8000}),
}
