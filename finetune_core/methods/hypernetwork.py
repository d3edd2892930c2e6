"""Hypernetworks: residual MLPs on the key and value inputs of every attention layer, picked by context width.

Objective: the LDM loss with the modules applied (methods.md §3.2). Artefact: the WebUI's hypernetwork `.pt`
(webui-integration.md §6b). The text encoder is frozen, so the loop may cache prompt conditioning.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from finetune_core.errors import ArtifactError, ConfigError, ModelMismatchError
from finetune_core.formats.atomic import require_finite
from finetune_core.formats.hypernetwork_file import (
    HypernetworkFile,
    dropout_structure_for,
    read_hypernetwork,
    write_hypernetwork,
)
from finetune_core.formats.names import find_artifact
from finetune_core.formats.optim_sidecar import (
    OptimizerSidecar,
    file_shorthash,
    webui_optimizer_name,
    write_optimizer_sidecar,
)
from finetune_core.methods.base import ArtifactMeta, ArtifactMethod, InferenceExtras, MethodSpec, ParamGroup
from finetune_core.methods.hypernetwork_net import (
    WEIGHT_INITS,
    HypernetworkModule,
    activation_choices,
    structure_problems,
)
from finetune_core.model.interface import DiffusionModel
from finetune_core.settings import parse_numbers
from finetune_core.train.memory import MemoryNeeds, hypernetwork_parameters
from finetune_core.train.objective import weighted_mse
from finetune_core.train.train_batch import TrainBatch

TEXT_WIDTH_FAMILY = {768: "SD1", 1024: "SD2", 2048: "SDXL"}


def parse_sizes(text: str) -> list[int]:
    """'768, 320, 640, 1280' -> [768, 320, 640, 1280]."""
    values = parse_numbers(text, "module sizes")
    if not values or any(v <= 0 or v != int(v) for v in values):
        raise ConfigError(f"module sizes {text!r} must be positive whole numbers such as '768, 320, 640, 1280'")
    return [int(v) for v in values]


@dataclass(frozen=True)
class HypernetworkCreate:
    """How a new hypernetwork is shaped (the WebUI's "Create hypernetwork" form and defaults)."""

    sizes: str = field(default="768, 320, 640, 1280", metadata={
        "label": "Modules", "help": "Context widths to attach modules to: 768 SD1 text, 1024 SD2 text, 2048 SDXL "
        "text, 320/640/1280 self-attention."})
    layer_structure: str = field(default="1, 2, 1", metadata={
        "label": "Layer structure", "help": "Width multipliers of the MLP's layers; must start and end with 1."})
    activation_func: str = field(default="linear", metadata={
        "label": "Activation function", "choices": activation_choices(),
        "help": "Applied after every layer but the last ('linear' = none; 'swish' is Hardswish, as in the WebUI)."})
    weight_init: str = field(default="Normal", metadata={
        "label": "Weight initialization", "choices": list(WEIGHT_INITS), "advanced": True,
        "help": "How new layers start; LayerNorm layers always use Normal."})
    add_layer_norm: bool = field(default=False, metadata={"label": "Add layer normalization", "advanced": True,
                                                          "help": "A LayerNorm after every linear layer."})
    use_dropout: bool = field(default=False, metadata={"label": "Use dropout", "advanced": True,
                                                       "help": "Dropout between layers while training."})
    dropout_structure: str = field(default="0, 0, 0", metadata={
        "label": "Dropout structure", "advanced": True,
        "help": "Dropout probability per layer; first and last must be 0; same length as the layer structure."})
    activate_output: bool = field(default=False, metadata={"label": "Activate output", "advanced": True,
                                                           "help": "Also apply the activation after the last layer."})

    def shape(self) -> tuple[list[int], list[float], list[float] | None]:
        """Parse and validate sizes, layer structure and dropout structure; raise ConfigError listing problems."""
        problems: list[str] = []
        parsed: dict[str, Any] = {}
        for key, parse in (("sizes", parse_sizes),
                           ("layers", lambda t: parse_numbers(t, "layer structure")),
                           ("dropout", lambda t: parse_numbers(t, "dropout structure"))):
            try:
                parsed[key] = parse({"sizes": self.sizes, "layers": self.layer_structure,
                                     "dropout": self.dropout_structure}[key])
            except ConfigError as exc:
                problems.extend(exc.problems)
        dropout = parsed.get("dropout") if self.use_dropout else None
        if "layers" in parsed:
            problems += structure_problems(parsed["layers"], dropout, self.activation_func, self.weight_init)
        if problems:
            raise ConfigError(problems)
        return parsed["sizes"], parsed["layers"], dropout

    def validate(self) -> None:
        self.shape()


@dataclass(frozen=True)
class HypernetworkConfig(HypernetworkCreate):
    """Settings of a hypernetwork run."""

    continue_from: str = field(default="", metadata={
        "label": "Continue from hypernetwork",
        "help": "An existing hypernetwork file (path, or name in the hypernetworks folder) to keep training from "
                "its step; empty creates a new one from the shape above."})
    preview_multiplier: float = field(default=1.0, metadata={
        "label": "Preview strength", "advanced": True, "help": "Multiplier applied when sampling previews."})


class Hypernetwork(ArtifactMethod):
    """The Method for hypernetworks: the (k, v) module pairs are the only trainable parameters."""

    name = "hypernetwork"
    caches_text = True

    def __init__(self, config: HypernetworkConfig, file: HypernetworkFile) -> None:
        self.config = config
        self.file = file
        self.pairs = nn.ModuleDict({str(size): nn.ModuleList([_module(file, size, sd) for sd in state_dicts])
                                    for size, state_dicts in file.layers.items()})
        self.pairs.train()

    def transform(self, context: torch.Tensor, is_cross: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v contexts for an attention layer; widths without a module pass through unchanged."""
        pair = self._pair(str(context.shape[-1]))
        if pair is None:
            return context, context
        source = context.to(pair[0].weight_dtype)
        return pair[0](source).to(context.dtype), pair[1](source).to(context.dtype)

    def _pair(self, width: str) -> tuple[HypernetworkModule, HypernetworkModule] | None:
        """The (k, v) modules for a context width key, typed (ModuleDict items are plain Modules to the checker)."""
        if width not in self.pairs:
            return None
        pair = self.pairs[width]
        return cast(HypernetworkModule, pair[0]), cast(HypernetworkModule, pair[1])  # type: ignore[index]

    def check(self, model: DiffusionModel) -> list[str]:
        """Refuse a hypernetwork for another family; list sizes that never apply to this model as warnings."""
        widths = model.attention_context_widths()
        available = set().union(*widths.values())
        sizes = sorted(int(s) for s in self.pairs)
        text_sizes = [s for s in sizes if s in TEXT_WIDTH_FAMILY]
        if text_sizes and model.context_width not in sizes:
            raise ModelMismatchError(
                f"this hypernetwork has modules for {TEXT_WIDTH_FAMILY[text_sizes[0]]} text ({text_sizes[0]} wide) "
                f"but the loaded {model.family.upper()} model's text context is {model.context_width} wide; "
                f"a hypernetwork only works on the model family it was made for")
        unused = [s for s in sizes if s not in available]
        if unused and len(unused) == len(sizes):
            raise ModelMismatchError(f"none of the module sizes {sizes} matches an attention layer of the loaded "
                                     f"model (it has {sorted(available)}); choose sizes from those")
        if unused:
            return [(f"module sizes {unused} match no attention layer of the loaded model (it has "
                     f"{sorted(available)}); those modules will never apply")]
        return []

    def trainable_parameters(self, model: DiffusionModel) -> list[ParamGroup]:
        return [ParamGroup("hypernetwork", list(self.pairs.parameters()), weight_decay=0.01)]

    def training_context(self, model: DiffusionModel) -> AbstractContextManager[None]:
        """The modules act on every attention layer for the whole run, so backward (and the recomputation gradient
        checkpointing does in it) sees the same forward."""
        return model.context_transform(self.transform)

    def loss(self, model: DiffusionModel, batch: TrainBatch) -> torch.Tensor:
        cond = batch.cond
        if cond is None:
            with torch.no_grad():
                cond = model.encode_prompts(batch.prompts)
        pred = model.predict(batch.noisy_latents, batch.timesteps, cond, batch.size_cond)
        return weighted_mse(pred, batch.target, batch.loss_weight, batch.snr_weight)

    def inference_extras(self) -> InferenceExtras:
        return InferenceExtras(context_transform=_InferenceTransform(self))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.pairs.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.pairs.load_state_dict(dict(state))

    def current_file(self, meta: ArtifactMeta) -> HypernetworkFile:
        layers = {int(size): tuple(_cpu_state(m) for m in self._pair(size) or ()) for size in self.pairs}
        return _replace_file(self.file, layers=layers, step=meta.step, sd_checkpoint=meta.model.shorthash,
                             sd_checkpoint_name=meta.model.name)

    def optimizer_sidecar(self, artifact: Path, optimizer: torch.optim.Optimizer,
                          optimizer_name: str) -> Path | None:
        """The WebUI's `<file>.pt.optim`: it resumes the optimizer named there when the hash matches the file;
        it only knows torch's own optimizers, so none is written for the others."""
        webui_name = webui_optimizer_name(optimizer_name)
        if webui_name is None:
            return None
        sidecar = OptimizerSidecar(hash=file_shorthash(artifact), optimizer_state_dict=optimizer.state_dict(),
                                   optimizer_name=webui_name)
        return write_optimizer_sidecar(artifact, sidecar)

    def write_artifact(self, directory: Path, stem: str, meta: ArtifactMeta, overwrite: bool) -> list[Path]:
        path = Path(directory) / f"{stem}.pt"
        write_hypernetwork(self.current_file(meta), path, overwrite=overwrite)
        return [path]


class _InferenceTransform:
    """The module pairs in eval mode at the preview multiplier, restored to training mode after each call."""

    def __init__(self, method: Hypernetwork) -> None:
        self.method = method

    def __call__(self, context: torch.Tensor, is_cross: bool) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = self.method.pairs
        was_training = pairs.training
        for module in pairs.modules():
            if isinstance(module, HypernetworkModule):
                module.multiplier = self.method.config.preview_multiplier
        pairs.eval()
        try:
            with torch.no_grad():
                return self.method.transform(context, is_cross)
        finally:
            pairs.train(was_training)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()}


def _replace_file(file: HypernetworkFile, **changes: Any) -> HypernetworkFile:
    values = {f.name: getattr(file, f.name) for f in fields(file)}
    values.update(changes)
    return HypernetworkFile(**values)


def _module(file: HypernetworkFile, size: int, state: Mapping[str, torch.Tensor] | None) -> HypernetworkModule:
    dropout = file.dropout_structure
    if dropout is None:  # as write_hypernetwork fills it in
        dropout = dropout_structure_for(file.layer_structure, file.use_dropout, file.last_layer_dropout)
    # As the WebUI: the stored dropout structure builds the Dropout layers, whatever `use_dropout` says.
    module = HypernetworkModule(size, list(file.layer_structure), file.activation_func or "linear",
                                file.weight_initialization or "Normal", bool(file.is_layer_norm),
                                bool(file.activate_output), list(dropout))
    if state is not None:
        missing, unexpected = module.load_state_dict(dict(state), strict=False)
        if missing or unexpected:
            raise ArtifactError(f"hypernetwork {file.name!r}: the {size} module's weights do not match its layer "
                                f"structure {list(file.layer_structure)} (missing {missing[:3]}, unexpected "
                                f"{unexpected[:3]})")
    return module


def create_hypernetwork(name: str, config: HypernetworkCreate, seed: int = 0) -> HypernetworkFile:
    """A new hypernetwork file object at step 0 with freshly initialised modules (seeded, reproducible)."""
    sizes, layer_structure, dropout = config.shape()
    shell = HypernetworkFile(name=name, layers={}, step=0, layer_structure=layer_structure,
                             activation_func=config.activation_func, is_layer_norm=config.add_layer_norm,
                             weight_initialization=config.weight_init, sd_checkpoint=None, sd_checkpoint_name=None,
                             activate_output=config.activate_output, use_dropout=config.use_dropout,
                             dropout_structure=dropout or [0.0] * len(layer_structure),
                             last_layer_dropout=bool(dropout and len(dropout) > 2 and dropout[-2] > 0),
                             optional_info=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        shell.layers = {size: (_cpu_state(_module(shell, size, None)), _cpu_state(_module(shell, size, None)))
                        for size in sizes}
    return shell


def load_for_training(name: str, config: HypernetworkConfig, hypernetworks_dir: Path, seed: int = 0) -> Hypernetwork:
    """Continue an existing hypernetwork file, or create a new one from the configured shape."""
    if config.continue_from:
        source = resolve_hypernetwork(config.continue_from, hypernetworks_dir)
        existing = read_hypernetwork(source)
        require_finite(((f"{size}/{key}", t) for size, pair in existing.layers.items() for sd in pair
                        for key, t in sd.items()), source)
        existing.name = name
        return Hypernetwork(config, existing)
    return Hypernetwork(config, create_hypernetwork(name, config, seed))


def resolve_hypernetwork(reference: str, hypernetworks_dir: Path) -> Path:
    """A path, or a name in the hypernetworks folder (searched recursively, like the WebUI's list)."""
    return find_artifact(reference, hypernetworks_dir, (".pt",), "hypernetwork")



def create_file(model: DiffusionModel, name: str, config: HypernetworkCreate, directory: Path,
                overwrite: bool) -> list[Path]:
    """Write a new, untrained hypernetwork `<directory>/<name>.pt` (the WebUI's Create hypernetwork)."""
    file = create_hypernetwork(name, config)
    file.sd_checkpoint, file.sd_checkpoint_name = model.identity.shorthash, model.identity.name
    return [write_hypernetwork(file, Path(directory) / f"{name}.pt", overwrite)]


def for_model(model: DiffusionModel, config: HypernetworkConfig) -> HypernetworkConfig:
    """The WebUI's default sizes name SD1's 768-wide text; on SD2/SDXL that module is made at the model's text
    width instead, so the defaults train on every family."""
    default_sizes = HypernetworkCreate.sizes
    if not config.continue_from and config.sizes == default_sizes and model.context_width != 768:
        return replace(config, sizes=default_sizes.replace("768", str(model.context_width)))
    return config


def build(model: DiffusionModel, name: str, config: HypernetworkConfig, directory: Path, seed: int) -> Hypernetwork:
    """The registry's constructor: continue a file or create new modules seeded by the run seed."""
    method = load_for_training(name, for_model(model, config), directory, seed)
    method.check(model)
    return method


def memory_needs(model: DiffusionModel, config: HypernetworkConfig) -> MemoryNeeds:
    """A k and a v MLP per module size that matches an attention layer of the model."""
    sizes, layers, _ = for_model(model, config).shape()
    available = set().union(*model.attention_context_widths().values())
    return MemoryNeeds(hypernetwork_parameters({s for s in sizes if s in available}, tuple(layers)))


class HypernetworkSpec(MethodSpec):
    """Hypernetworks as hosts see them."""

    key = Hypernetwork.name
    label = "Hypernetwork"
    description = "Small networks on every attention layer's keys and values; good for styles."
    config_type = HypernetworkConfig
    create_type = HypernetworkCreate
    output_kind = "hypernetworks"
    log_folder = "hypernetwork"
    data_defaults = {"template": "hypernetwork.txt"}
    train_defaults = {"learning_rate": "0.00001"}
    name_help = "The hypernetwork's file name; the WebUI applies it with <hypernet:NAME:1> in a prompt."

    def build(self, model: DiffusionModel, name: str, config: HypernetworkConfig, directory: Path,
              seed: int) -> Hypernetwork:
        return build(model, name, config, directory, seed)

    def memory(self, model: DiffusionModel, config: HypernetworkConfig) -> MemoryNeeds:
        return memory_needs(model, config)

    def create(self, model: DiffusionModel, name: str, config: HypernetworkCreate, directory: Path,
               overwrite: bool) -> list[Path]:
        return create_file(model, name, config, directory, overwrite)

    def continue_from(self, config: HypernetworkConfig) -> str:
        return config.continue_from


METHOD = HypernetworkSpec()
