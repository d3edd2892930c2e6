"""Weight adapters (LoRA and the other network types) on a model's layers, for both backends: which layers there are,
by kohya name, and applying adapters to them so that every hook comes off again.

A plain Linear, Conv2d, GroupNorm or LayerNorm layer gets a forward hook (`output + adapter(input, weight)`), so the
frozen base computes as before and only the adapter's tensors see gradients. A weight the host uses without calling
a layer (the query/key/value rows of an `nn.MultiheadAttention`'s `in_proj_weight`, and its `out_proj.weight`, in
OpenCLIP) gets a parametrization that adds the adapters' weight deltas to those rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from finetune_core.errors import ArtifactError, ModelMismatchError
from finetune_core.formats.checkpoint_keys import hf_layer_weights
from finetune_core.formats.lora_file import fits, read_lora
from finetune_core.formats.lora_keys import TEXT, text_layer, unet_layer
from finetune_core.model.interface import AdapterTarget, NetworkCheck, WeightAdapter

_PLAIN = (nn.Linear, nn.Conv2d)
_NORMS = (nn.GroupNorm, nn.LayerNorm)  # subclasses too (LDM's GroupNorm32)


@dataclass(frozen=True)
class Layer:
    """Where a target lives: a layer whose output is hooked, or rows of a weight the host uses directly."""

    module: nn.Module
    weight: str = ""  # "" hooks the module's output; else the attribute name of the fused weight on `module`
    rows: slice | None = None


Layers = dict[str, tuple[AdapterTarget, Layer]]


def _target(name: str, module_key: str, block: str, layer: nn.Module) -> AdapterTarget:
    if isinstance(layer, nn.GroupNorm):
        channels = layer.num_channels
        return AdapterTarget(name, module_key, block, channels, channels, norm_groups=layer.num_groups,
                             norm_eps=layer.eps)
    if isinstance(layer, nn.LayerNorm):
        width = int(layer.normalized_shape[-1])
        return AdapterTarget(name, module_key, block, width, width, norm_groups=-1, norm_eps=layer.eps)
    if isinstance(layer, nn.Conv2d):
        return AdapterTarget(name, module_key, block, layer.in_channels, layer.out_channels,
                             _pair(layer.kernel_size), _pair(layer.stride), _pair(layer.padding))
    weight: Any = layer.weight
    return AdapterTarget(name, module_key, block, int(weight.shape[1]), int(weight.shape[0]))


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, tuple) else (int(value), int(value))


def unet_layers(unet: nn.Module, family: str, layout: str) -> Layers:
    """The UNet's adaptable layers; `layout` says whether module paths are diffusers' or LDM's. Aliases (diffusers'
    `Conv2d_0` for a downsampler's `conv`) are skipped: only paths the checkpoint mapping knows get a name."""
    found: Layers = {}
    for path, layer in unet.named_modules(remove_duplicate=False):
        if type(layer) not in _PLAIN and not (isinstance(layer, _NORMS) and getattr(layer, "weight", None) is not None):
            continue
        named = unet_layer(path, family, layout)
        if named is not None:
            found[named[0]] = (_target(named[0], "unet", named[1], layer), Layer(layer))
    return found


def hf_text_layers(encoder: nn.Module, module_key: str, prefix: str) -> Layers:
    """A transformers CLIP text model's attention and MLP layers."""
    found: Layers = {}
    for path, layer in encoder.named_modules():
        name = text_layer(path, prefix) if type(layer) in _PLAIN else None
        if name is not None:
            found[name] = (_target(name, module_key, TEXT, layer), Layer(layer))
    return found


def openclip_text_layers(text_model: nn.Module, module_key: str, prefix: str, layers_run: int) -> Layers:
    """OpenCLIP's residual blocks under their transformers names (via the checkpoint mapping); only the first
    `layers_run` blocks, the ones the embedder runs (SD2 stops before its last)."""
    found: Layers = {}
    blocks: Any = text_model.transformer.resblocks  # type: ignore[union-attr]
    for index, block in enumerate(blocks):
        if index >= layers_run:
            break
        hf_prefix = f"text_model.encoder.layers.{index}."
        for path, layer in block.named_modules():
            if isinstance(layer, nn.MultiheadAttention):
                found.update(_fused(layer, path, hf_prefix, module_key, prefix))
            elif type(layer) is nn.Linear:
                for key in hf_layer_weights(hf_prefix, f"{path}.weight", layer.weight):
                    name = text_layer(key.removesuffix(".weight"), prefix)
                    if name is not None:
                        found[name] = (_target(name, module_key, TEXT, layer), Layer(layer))
    return found


def _fused(attention: nn.MultiheadAttention, path: str, hf_prefix: str, module_key: str, prefix: str) -> Layers:
    """q/k/v as thirds of `in_proj_weight`, and `out_proj`, which the attention reads without calling it."""
    found: Layers = {}
    width = attention.embed_dim
    names = hf_layer_weights(hf_prefix, f"{path}.in_proj_weight", attention.in_proj_weight)
    for index, key in enumerate(names):
        name = text_layer(key.removesuffix(".weight"), prefix)
        if name is not None:
            target = AdapterTarget(name, module_key, TEXT, width, width)
            found[name] = (target, Layer(attention, "in_proj_weight", slice(index * width, (index + 1) * width)))
    out = attention.out_proj
    for key in hf_layer_weights(hf_prefix, f"{path}.out_proj.weight", out.weight):
        name = text_layer(key.removesuffix(".weight"), prefix)
        if name is not None:
            target = AdapterTarget(name, module_key, TEXT, out.in_features, out.out_features)
            found[name] = (target, Layer(out, "weight", slice(0, out.out_features)))
    return found


def layer_weight(layers: Layers, name: str) -> torch.Tensor:
    """The weight a named target changes: the layer's own, or its rows of a fused weight (detached)."""
    if name not in layers:
        raise ModelMismatchError(f"this model has no layer named {name}")
    layer = layers[name][1]
    weight: torch.Tensor = getattr(layer.module, layer.weight or "weight")
    return (weight[layer.rows] if layer.rows is not None else weight).detach()


def check_with_reader(layers: Layers, path: Path, loader: str = "our reader") -> NetworkCheck:
    """A network file checked with our reader: a module applies when its name is a layer of the model and its type's
    change fits that layer's weight."""
    try:
        file = read_lora(path)
    except ArtifactError as exc:
        return NetworkCheck(loader, 0, 0, (), str(exc))
    unmatched = [name for name, module in sorted(file.modules.items())
                 if name not in layers or not fits(module, tuple(layer_weight(layers, name).shape))]
    return NetworkCheck(loader, len(file.modules), len(file.modules) - len(unmatched), tuple(unmatched))


class AdapterStack:
    """The adapter sets applied to one model; the innermost set is the one that acts (previews replace the
    training set while they sample)."""

    def __init__(self) -> None:
        self._sets: list[Mapping[str, WeightAdapter]] = []
        self._fused: dict[tuple[int, str], _FusedDelta] = {}  # one parametrization per fused weight, for all sets

    def is_current(self, adapters: Mapping[str, WeightAdapter]) -> bool:
        return bool(self._sets) and self._sets[-1] is adapters

    def innermost(self) -> Mapping[str, WeightAdapter] | None:
        return self._sets[-1] if self._sets else None

    @contextmanager
    def applied(self, layers: Layers, adapters: Mapping[str, WeightAdapter]) -> Iterator[None]:
        unknown = sorted(set(adapters) - set(layers))
        if unknown:
            raise ModelMismatchError(f"this model has no layer named {', '.join(unknown[:3])}"
                                     f"{' (and others)' if len(unknown) > 3 else ''}: the LoRA was made for "
                                     f"another model family or layout")
        current = dict(adapters)
        fused: dict[tuple[int, str], list[tuple[str, Layer]]] = {}
        with ExitStack() as stack:
            self._sets.append(current)
            stack.callback(self._sets.pop)
            for name in current:
                layer = layers[name][1]
                if layer.weight:
                    fused.setdefault((id(layer.module), layer.weight), []).append((name, layer))
                else:
                    handle = layer.module.register_forward_hook(self._hook(current, name))
                    stack.callback(handle.remove)
            for entries in fused.values():
                stack.enter_context(self._parametrized(current, entries))
            yield

    def _hook(self, current: Mapping[str, WeightAdapter], name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            if not self.is_current(current):
                return None
            weight: Any = module.weight
            return output + current[name](inputs[0], weight).to(output.dtype)
        return hook

    @contextmanager
    def _parametrized(self, current: Mapping[str, WeightAdapter], entries: list[tuple[str, Layer]]) -> Iterator[None]:
        """The set's rows of a fused weight. Every set shares one parametrization of the weight: torch removes a
        weight's parametrizations all at once, so a nested set (a preview's, during training) of its own would
        take the outer set's away when it ends."""
        module, weight = entries[0][1].module, entries[0][1].weight
        key = (id(module), weight)
        delta = self._fused.get(key)
        if delta is None:
            delta = self._fused[key] = _FusedDelta(self)
            parametrize.register_parametrization(module, weight, delta, unsafe=True)
        delta.add(current, entries)
        try:
            yield
        finally:
            delta.discard(current)
            if delta.empty:
                del self._fused[key]
                parametrize.remove_parametrizations(module, weight, leave_parametrized=False)


class _FusedDelta(nn.Module):
    """Adds the innermost set's weight deltas to its rows of a fused weight (a torch parametrization)."""

    def __init__(self, stack: AdapterStack) -> None:
        super().__init__()
        self._stack = stack
        self._rows: dict[int, tuple[Mapping[str, WeightAdapter], list[tuple[slice, str]]]] = {}  # by id of the set

    def add(self, current: Mapping[str, WeightAdapter], entries: list[tuple[str, Layer]]) -> None:
        rows = sorted(((layer.rows or slice(0, 0), name) for name, layer in entries), key=lambda e: e[0].start)
        self._rows[id(current)] = (current, rows)

    def discard(self, current: Mapping[str, WeightAdapter]) -> None:
        self._rows.pop(id(current), None)

    @property
    def empty(self) -> bool:
        return not self._rows

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        innermost = self._stack.innermost()
        found = self._rows.get(id(innermost)) if innermost is not None else None
        if found is None:  # the acting set has no adapter on this weight
            return weight
        current, rows = found
        pieces, start = [], 0
        for row_slice, name in rows:
            if row_slice.start > start:
                pieces.append(weight.new_zeros(row_slice.start - start, *weight.shape[1:]))
            base = weight[row_slice].detach()
            pieces.append(current[name].weight_delta(base).reshape(-1, *weight.shape[1:]).to(weight.dtype))
            start = row_slice.stop
        if start < weight.shape[0]:
            pieces.append(weight.new_zeros(weight.shape[0] - start, *weight.shape[1:]))
        return weight + torch.cat(pieces)
