"""Building the LoRA method's network for a model: which layers get modules and how they are shaped (kohya's
rules, lora.md §3.1, and the chosen network type's own settings), a new network with the type's init, or the network
of a file to continue, checked against the model's layers and the settings."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from finetune_core.errors import ConfigError, ModelMismatchError
from finetune_core.formats.atomic import require_finite
from finetune_core.formats.lora_file import ALPHA, SUFFIXES, NetworkFile, NetworkModule, family_of, fits, read_lora
from finetune_core.formats.lora_keys import RESNET, SAMPLER, TRANSFORMER
from finetune_core.formats.names import find_artifact
from finetune_core.formats.networks import DORA, NETWORK_TYPES, NORM, Dropouts, NetworkType, Shape, column_norm
from finetune_core.methods.lora_net import LoraNetwork, NetworkAdapter, layer_of
from finetune_core.model.interface import AdapterTarget, DiffusionModel

WeightOf = Callable[[str], torch.Tensor]  # a layer's current weight by kohya name


Requested = Iterator[tuple[AdapterTarget, Shape, float]]


def requested_targets(targets: Mapping[str, AdapterTarget], config: Any) -> Requested:
    """(target, shape settings, alpha) for every layer the settings adapt, among the layer kinds the type has: the
    UNet's transformer blocks (a norm-only type: the norms of its transformer and residual blocks); with a conv rank
    also its resnets and samplers (3x3 convolutions at the conv rank, the rest at the rank); the text encoders."""
    kind = NETWORK_TYPES[config.network]
    base = Shape(config.rank, config.factor, config.full_matrix, config.blocks, config.constraint)
    conv = Shape(config.conv_rank, config.factor, config.full_matrix, config.blocks, config.constraint)
    unet_blocks = (TRANSFORMER, RESNET) if kind.kinds == {NORM} else (TRANSFORMER,)
    for name in sorted(targets):
        target = targets[name]
        if target.kind not in kind.kinds:
            continue
        if target.module != "unet":
            if config.train_text_encoder:
                yield target, base, config.alpha
        elif config.train_unet and target.block in unet_blocks:
            yield target, base, config.alpha
        elif config.train_unet and config.conv_rank and target.block in (RESNET, SAMPLER):
            if target.kernel_size not in (None, (1, 1)):
                yield target, conv, config.conv_alpha
            else:
                yield target, base, config.alpha


def _dropouts(config: Any) -> Dropouts:
    return Dropouts(config.dropout, config.rank_dropout)


def new_network(targets: Mapping[str, AdapterTarget], config: Any, seed: int, weight_of: WeightOf) -> LoraNetwork:
    """Modules of the chosen type for the requested layers with the type's init, drawn from the run seed; with DoRA
    each gets `dora_scale` = its layer's column norms (so the start is the base model)."""
    kind = NETWORK_TYPES[config.network]
    chosen = list(requested_targets(targets, config))
    if config.conv_rank and not any(t.block in (RESNET, SAMPLER) for t, _, _ in chosen):
        raise ConfigError(f"conv_rank is {config.conv_rank} but this model has no convolution layers to adapt; "
                          f"set conv_rank to 0")
    if not chosen:
        raise ConfigError(f"the {kind.label} network has no layer to adapt in the parts these settings train; "
                          f"train the UNet")
    problems = [p for p in (kind.problem(layer_of(t), shape) for t, shape, _ in chosen) if p]
    if problems:
        more = f" (and {len(problems) - 1} more layers)" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)
    generator = torch.Generator().manual_seed(int(seed))
    adapters = {}
    for target, shape, alpha in chosen:
        adapters[target.name] = _new_adapter(kind, target, shape, alpha, config, generator, weight_of)
    return LoraNetwork(adapters)


def _new_adapter(kind: NetworkType, target: AdapterTarget, shape: Shape, alpha: float, config: Any,
                 generator: torch.Generator, weight_of: WeightOf) -> NetworkAdapter:
    layer = layer_of(target)
    tensors = {part: torch.zeros(size) for part, size in kind.shapes(layer, shape).items()}
    kind.init(tensors, layer, generator)
    written = kind.alpha(shape, float(alpha or shape.rank))  # kohya: alpha 0 means alpha = rank
    if written is not None:
        tensors[ALPHA] = torch.tensor(written)
    if config.dora:
        tensors[DORA] = column_norm(weight_of(target.name).detach().float().cpu())
    return NetworkAdapter(target, kind, tensors, _dropouts(config), config.module_dropout)


def network_from_file(file: NetworkFile, source: Path, model: DiffusionModel, config: Any) -> LoraNetwork:
    """The modules of a network file, which must be of the settings' type and fit this model's layers exactly."""
    family = family_of(file)
    if family is not None and family != model.family:
        raise ModelMismatchError(f"{source} is a LoRA for {family.upper()}, but the loaded model is "
                                 f"{model.family.upper()}; continue it on a {family.upper()} model, or start a new "
                                 f"LoRA")
    _check_kind(file, source, config)
    targets = model.adapter_targets()
    missing = sorted(set(file.modules) - set(targets))
    if missing and len(missing) == len(file.modules):
        raise ModelMismatchError(f"{source}: none of its {len(file.modules)} modules names a layer of this "
                                 f"{model.family.upper()} model (e.g. {missing[0]}); it was made for another model "
                                 f"or layout")
    if missing:
        raise ModelMismatchError(f"{source} has {len(missing)} layer(s) this {model.family.upper()} model does not "
                                 f"have (e.g. {missing[0]}); it was made for another model or layout")
    adapters = {}
    for name, module in sorted(file.modules.items()):
        target = targets[name]
        _check_shapes(module, target, source)
        adapters[name] = NetworkAdapter(target, module.type, module.tensors, _dropouts(config), config.module_dropout)
    return LoraNetwork(adapters)


def _check_kind(file: NetworkFile, source: Path, config: Any) -> None:
    kinds = sorted({m.kind for m in file.modules.values()})
    if kinds != [config.network]:
        labels = " and ".join(NETWORK_TYPES[k].label for k in kinds)
        raise ConfigError(f"{source} is a {labels} file, but the settings train {NETWORK_TYPES[config.network].label}; "
                          f"set network to {kinds[0]} to continue it, or start a new file")
    dora = {m.dora for m in file.modules.values()}
    if dora != {bool(config.dora)}:
        state = "has" if True in dora else "has no"
        raise ConfigError(f"{source} {state} DoRA magnitudes (dora_scale), but dora is {bool(config.dora)}; set dora "
                          f"to {True in dora} to continue it")


def _check_shapes(module: NetworkModule, target: AdapterTarget, source: Path) -> None:
    """The type's change must compute for the layer's weight shape (and DoRA's magnitudes fit its columns)."""
    shape = layer_of(target).weight_shape
    if not fits(module, shape):
        shapes = ", ".join(f"{p} {tuple(t.shape)}" for p, t in module.tensors.items() if p != ALPHA)
        raise ModelMismatchError(f"{source}: the layer {target.name} has {shapes}, which do not fit this model's "
                                 f"layer of shape {tuple(shape)}")


def build_network(model: DiffusionModel, config: Any, directory: Path, seed: int) -> tuple[LoraNetwork, int, list[str]]:
    """(network, start step, notes for the user): continue `config.continue_from`, or a new network."""
    targets = model.adapter_targets()
    if not config.continue_from:
        return new_network(targets, config, seed, model.adapter_weight), 0, []
    source = find_artifact(config.continue_from, directory, SUFFIXES, "LoRA")
    file = read_lora(source)
    require_finite(((f"{name}.{p}", t) for name, m in file.modules.items() for p, t in m.tensors.items()
                    if t.is_floating_point()), source)
    network = network_from_file(file, source, model, config)
    parts = {adapter.target.module == "unet" for adapter in network.by_name().values()}
    trained = {True} if config.train_unet else set()
    trained |= {False} if config.train_text_encoder else set()
    if not parts & trained:
        raise ConfigError(f"{source} adapts only the {'UNet' if True in parts else 'text encoder'}, which these "
                          f"settings do not train; turn training of that part on")
    sizes = sorted({a.kind.describe(a.tensors()) for a in network.by_name().values()})
    notes = [f"continuing {source}: its {len(network.adapters)} {network.kinds()[0].label} modules ("
             f"{'; '.join(sizes)}) and alphas are kept; the rank, alpha, conv and type settings only shape new files"]
    if trained - parts:
        notes.append(f"{source} has no {'UNet' if True in trained - parts else 'text encoder'} layers; only its "
                     f"own layers train")
    step = file.metadata.get("ss_steps", "")
    return network, int(step) if step.isdigit() else 0, notes
