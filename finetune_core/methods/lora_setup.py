"""Building a LoRA network for a model: which layers get adapters and at what rank (kohya's rules, lora.md §3.1),
a new network with kohya's init, or the network of a file to continue, checked against the model's layers."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from finetune_core.errors import ConfigError, ModelMismatchError
from finetune_core.formats.atomic import require_finite
from finetune_core.formats.lora_file import SUFFIXES, LoraFile, family_of, read_lora
from finetune_core.formats.lora_keys import RESNET, SAMPLER, TRANSFORMER
from finetune_core.formats.names import find_artifact
from finetune_core.methods.lora_net import LoraAdapter, LoraNetwork, kohya_init
from finetune_core.model.interface import AdapterTarget, DiffusionModel


def requested_targets(targets: Mapping[str, AdapterTarget], config: Any) -> Iterator[tuple[AdapterTarget, int, float]]:
    """(target, rank, alpha) for every layer the settings adapt: the UNet's transformer blocks; with a conv rank
    also its resnets and samplers (3x3 convolutions at the conv rank, the rest at the rank); the text encoders."""
    for name in sorted(targets):
        target = targets[name]
        if target.module != "unet":
            if config.train_text_encoder:
                yield target, config.rank, config.alpha
        elif config.train_unet and target.block == TRANSFORMER:
            yield target, config.rank, config.alpha
        elif config.train_unet and config.conv_rank and target.block in (RESNET, SAMPLER):
            if target.kernel_size not in (None, (1, 1)):
                yield target, config.conv_rank, config.conv_alpha
            else:
                yield target, config.rank, config.alpha


def _adapter(target: AdapterTarget, rank: int, alpha: float | None, config: Any) -> LoraAdapter:
    return LoraAdapter(target, rank, alpha, config.dropout, config.rank_dropout, config.module_dropout)


def new_network(targets: Mapping[str, AdapterTarget], config: Any, seed: int) -> LoraNetwork:
    """Adapters for the requested layers with kohya's init (down random, up zero), drawn from the run seed."""
    chosen = list(requested_targets(targets, config))
    if config.conv_rank and not any(t.block in (RESNET, SAMPLER) for t, _, _ in chosen):
        raise ConfigError(f"conv_rank is {config.conv_rank} but this model has no convolution layers to adapt; "
                          f"set conv_rank to 0")
    too_wide = [(t, r, _capacity(t)) for t, r, _ in chosen if r > _capacity(t)]
    if too_wide:
        target, rank, capacity = min(too_wide, key=lambda item: item[2])
        raise ConfigError(f"the rank {rank} is larger than the layer {target.name} can use ({capacity}: its "
                          f"{target.in_features} inputs and {target.out_features} outputs); use a rank of at most "
                          f"{capacity}")
    generator = torch.Generator().manual_seed(int(seed))
    adapters = {}
    for target, rank, alpha in chosen:
        adapter = _adapter(target, rank, alpha, config)
        kohya_init(adapter.down, adapter.up, generator)
        adapters[target.name] = adapter
    return LoraNetwork(adapters)


def _capacity(target: AdapterTarget) -> int:
    """The largest useful rank of a layer: the smaller side of its weight matrix."""
    kernel = target.kernel_size[0] * target.kernel_size[1] if target.kernel_size else 1
    return min(target.in_features * kernel, target.out_features)


def network_from_file(file: LoraFile, source: Path, model: DiffusionModel, config: Any) -> LoraNetwork:
    """The adapters of a LoRA file, which must fit this model's layers exactly (names and shapes)."""
    family = family_of(file)
    if family is not None and family != model.family:
        raise ModelMismatchError(f"{source} is a LoRA for {family.upper()}, but the loaded model is "
                                 f"{model.family.upper()}; continue it on a {family.upper()} model, or start a new "
                                 f"LoRA")
    targets = model.adapter_targets()
    missing = sorted(set(file.modules) - set(targets))
    if missing:
        raise ModelMismatchError(f"{source} has {len(missing)} layer(s) this {model.family.upper()} model does not "
                                 f"have (e.g. {missing[0]}); it was made for another model or layout")
    adapters = {}
    for name, module in sorted(file.modules.items()):
        target = targets[name]
        adapter = _adapter(target, module.rank, module.alpha, config)
        if tuple(module.down.shape) != tuple(adapter.down.shape) or tuple(module.up.shape) != tuple(adapter.up.shape):
            raise ModelMismatchError(f"{source}: the layer {name} has shapes {tuple(module.down.shape)} / "
                                     f"{tuple(module.up.shape)}, but this model's layer needs "
                                     f"{tuple(adapter.down.shape)} / {tuple(adapter.up.shape)}")
        with torch.no_grad():
            adapter.down.copy_(module.down.float())
            adapter.up.copy_(module.up.float())
        adapters[name] = adapter
    return LoraNetwork(adapters)


def build_network(model: DiffusionModel, config: Any, directory: Path, seed: int) -> tuple[LoraNetwork, int, list[str]]:
    """(network, start step, notes for the user): continue `config.continue_from`, or a new network."""
    targets = model.adapter_targets()
    if not config.continue_from:
        return new_network(targets, config, seed), 0, []
    source = find_artifact(config.continue_from, directory, SUFFIXES, "LoRA")
    file = read_lora(source)
    require_finite(((name, t) for name, m in file.modules.items() for t in (m.down, m.up)), source)
    network = network_from_file(file, source, model, config)
    parts = {adapter.target.module == "unet" for adapter in network.by_name().values()}
    trained = {True} if config.train_unet else set()
    trained |= {False} if config.train_text_encoder else set()
    if not parts & trained:
        raise ConfigError(f"{source} adapts only the {'UNet' if True in parts else 'text encoder'}, which these "
                          f"settings do not train; turn training of that part on")
    ranks = sorted({a.rank for a in network.by_name().values()})
    notes = [f"continuing {source}: its {len(network.adapters)} layers, rank(s) {', '.join(map(str, ranks))} and "
             f"alphas are kept; the rank, alpha and conv settings only shape new LoRAs"]
    if trained - parts:
        notes.append(f"{source} has no {'UNet' if True in trained - parts else 'text encoder'} layers; only its "
                     f"own layers train")
    step = file.metadata.get("ss_steps", "")
    return network, int(step) if step.isdigit() else 0, notes
