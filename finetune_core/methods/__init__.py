"""The methods, registered explicitly (one line each, like the WebUI Lora extension's `module_types`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_core.data.data_batch import TrainingData
from finetune_core.data.dataset_config import DatasetConfig
from finetune_core.methods import dreamartist, dreambooth, hypernetwork, lora, textual_inversion
from finetune_core.methods.base import Method, image_dataset
from finetune_core.methods.prior_preservation import resolve_class_folder
from finetune_core.model.interface import DiffusionModel
from finetune_core.train.memory import MemoryNeeds

# build(model, name, config, folder of existing artefacts, seed) -> Method
Build = Callable[[DiffusionModel, str, Any, Path, int], Method]
# create(model, name, create config, output folder, overwrite) -> paths written
Create = Callable[[DiffusionModel, str, Any, Path, bool], "list[Path]"]
# memory(model, config) -> what the method adds to the model in memory (for the estimate before Train)
Memory = Callable[[DiffusionModel, Any], MemoryNeeds]
# data(method config, dataset config, what [name] becomes) -> the run's training data
Data = Callable[[Any, DatasetConfig, str], TrainingData]
# resolve(method config, dataset config, the method's own folder in the logs) -> the method config with folder
# defaults filled in; run when a request is planned (no model yet), so it also refuses unusable folders then
Resolve = Callable[[Any, DatasetConfig, Path], Any]


@dataclass(frozen=True)
class MethodSpec:
    """What hosts need to know about a method: its forms, defaults and where its files go."""

    key: str
    label: str
    config_type: type
    create_type: type | None
    output_kind: str  # a field of OutputFolders: "embeddings", "hypernetworks", "checkpoints", "loras", ...
    log_folder: str  # the WebUI's log directory name for this method
    description: str
    build: Build
    create: Create | None
    memory: Memory
    data_defaults: dict[str, Any] = field(default_factory=dict)  # overrides of DatasetConfig defaults
    train_defaults: dict[str, Any] = field(default_factory=dict)  # overrides of TrainConfig defaults
    data: Data = image_dataset  # the images of a run (DreamBooth, LoRA: instance and class images in pairs)
    resolve: Resolve | None = None
    usual_max_lr: float = 0.0  # a learning rate above this gets a warning (the method's usual rates are far lower)
    name_help: str = "The file name of the artefact."  # what the name is for this method (the tab, --name)


METHODS: dict[str, MethodSpec] = {
    "textual-inversion": MethodSpec(
        "textual-inversion", "Textual Inversion", textual_inversion.TextualInversionConfig,
        textual_inversion.TextualInversionCreate, "embeddings", "textual_inversion",
        "Learn a new word (an embedding) for a subject or style; the model stays unchanged.",
        textual_inversion.build, textual_inversion.create_file, textual_inversion.memory_needs,
        data_defaults={"template": "style_filewords.txt"},
        train_defaults={"learning_rate": "0.005"},
        name_help="The embedding's file name, and the word you write in prompts."),
    "hypernetwork": MethodSpec(
        "hypernetwork", "Hypernetwork", hypernetwork.HypernetworkConfig, hypernetwork.HypernetworkCreate,
        "hypernetworks", "hypernetwork",
        "Small networks on every attention layer's keys and values; good for styles.",
        hypernetwork.build, hypernetwork.create_file, hypernetwork.memory_needs,
        data_defaults={"template": "hypernetwork.txt"},
        train_defaults={"learning_rate": "0.00001"},
        name_help="The hypernetwork's file name; the WebUI applies it with <hypernet:NAME:1> in a prompt."),
    "dreambooth": MethodSpec(
        "dreambooth", "DreamBooth", dreambooth.DreamBoothConfig, None, "checkpoints", "dreambooth",
        "Fine-tune the model itself on your subject, optionally with prior preservation; writes a checkpoint.",
        dreambooth.build, None, dreambooth.memory_needs,
        train_defaults={"learning_rate": "0.000005", "steps": 800, "save_every": 0, "preview_every": 200,
                        "csv_every": 50},
        data=dreambooth.training_data, resolve=resolve_class_folder, usual_max_lr=1e-3,
        name_help="The new checkpoint's file name; in prompts your subject is the instance token (e.g. sks)."),
    "dreamartist": MethodSpec(
        "dreamartist", "DreamArtist (APT)", dreamartist.DreamArtistConfig, dreamartist.DreamArtistCreate,
        "embeddings", "dreamartist",
        "A word NAME and its negative NAME-neg learned together under guidance, often from one image; use NAME in "
        "the prompt and NAME-neg in the negative prompt.",
        dreamartist.build, dreamartist.create_file, dreamartist.memory_needs,
        data_defaults={"template": "subject.txt", "attention_masks": True},
        train_defaults={"learning_rate": "0.003", "steps": 8000},
        name_help="The embeddings' file name: write NAME in the prompt and NAME-neg in the negative prompt."),
    "lora": MethodSpec(
        "lora", "LoRA", lora.LoraConfig, None, "loras", "lora",
        "Low-rank adapters on the UNet (and optionally the text encoders); the file <lora:NAME:1> loads.",
        lora.build, None, lora.memory_needs,
        data_defaults={"template": "filewords.txt"},
        train_defaults={"learning_rate": "0.0001"},
        data=lora.training_data, resolve=resolve_class_folder,
        name_help="The LoRA's file name; the WebUI applies it with <lora:NAME:1> in a prompt."),
}
