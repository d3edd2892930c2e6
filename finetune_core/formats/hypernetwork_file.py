"""Hypernetwork `.pt` files in the WebUI layout (webui-integration §6b); the nn.Module lives in methods/."""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune_core.errors import ArtifactError
from finetune_core.formats.atomic import load_pt, save_pt
from finetune_core.formats.describe import describe_object, is_embedding, is_hypernetwork

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
# Fields the WebUI writes next to the size keys, in its order.
METADATA_KEYS = ("step", "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
                 "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure",
                 "last_layer_dropout", "optional_info")
_LEGACY_KEY = re.compile(r"^linear([12])\.")
_LINEAR_KEY = re.compile(r"^linear\.(\d+)\.(weight|bias)$")


@dataclass
class HypernetworkFile:
    """A hypernetwork's weights and options as the WebUI stores them; defaults are those of a new network."""

    name: str
    layers: dict[int, tuple[StateDict, StateDict]]
    step: int = 0
    layer_structure: list[float] = field(default_factory=lambda: [1.0, 2.0, 1.0])
    activation_func: str | None = "linear"
    is_layer_norm: bool = False
    weight_initialization: str = "Normal"
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    activate_output: bool = False
    use_dropout: bool = False
    dropout_structure: list[float] | None = None
    last_layer_dropout: bool = False
    optional_info: str | None = None

    @property
    def sizes(self) -> list[int]:
        """The context widths this network has module pairs for."""
        return sorted(self.layers)

    def validate(self) -> None:
        """Raise ArtifactError unless the layers and options form a file the WebUI can build modules from."""
        ls = self.layer_structure
        if len(ls) < 2 or float(ls[0]) != 1.0 or float(ls[-1]) != 1.0:
            raise ArtifactError(f"hypernetwork '{self.name}': layer_structure must start and end with 1, got {ls}")
        dropout = self.dropout_structure
        if dropout is not None and len(dropout) != len(ls):
            raise ArtifactError(f"hypernetwork '{self.name}': dropout_structure {dropout} must have as many "
                                f"entries as layer_structure {ls}")
        if not self.layers:
            raise ArtifactError(f"hypernetwork '{self.name}' has no module sizes")
        for size, pair in self.layers.items():
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ArtifactError(f"hypernetwork '{self.name}': size {size!r} must be a positive int")
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ArtifactError(f"hypernetwork '{self.name}': size {size} needs a (k, v) pair of state dicts")
            for which, state in zip("kv", pair):
                _check_module(self.name, size, which, state, len(ls) - 1)


def write_hypernetwork(file: HypernetworkFile, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write `file` as the WebUI's hypernetwork dict: int size keys -> (state_dict_k, state_dict_v), then options."""
    file.validate()
    dropout = file.dropout_structure
    if dropout is None:
        dropout = dropout_structure_for(file.layer_structure, file.use_dropout, file.last_layer_dropout)
    obj: dict[Any, Any] = {int(size): (_plain_state(k), _plain_state(v)) for size, (k, v) in file.layers.items()}
    obj.update({
        "step": int(file.step), "name": str(file.name),
        "layer_structure": [float(x) for x in file.layer_structure],
        "activation_func": None if file.activation_func is None else str(file.activation_func),
        "is_layer_norm": bool(file.is_layer_norm), "weight_initialization": str(file.weight_initialization),
        "sd_checkpoint": _text(file.sd_checkpoint), "sd_checkpoint_name": _text(file.sd_checkpoint_name),
        "activate_output": bool(file.activate_output), "use_dropout": bool(file.use_dropout),
        "dropout_structure": [float(x) for x in dropout], "last_layer_dropout": bool(file.last_layer_dropout),
        "optional_info": _text(file.optional_info),
    })
    return save_pt(obj, path, overwrite)


def read_hypernetwork(path: str | os.PathLike[str]) -> HypernetworkFile:
    """Read a hypernetwork `.pt`, fixing legacy `linear1/linear2` keys and filling missing options as the WebUI does."""
    source = Path(path)
    return hypernetwork_from_obj(load_pt(source), source)


def hypernetwork_from_obj(obj: Any, source: Path) -> HypernetworkFile:
    """Turn a loaded object into a HypernetworkFile with the WebUI's defaults for options it lacks."""
    if not is_hypernetwork(obj):
        raise ArtifactError(f"{source} is not a hypernetwork: {_describe_other(obj)}")
    layers = {size: (fix_legacy_keys(pair[0]), fix_legacy_keys(pair[1]))
              for size, pair in obj.items() if isinstance(size, int)}
    layer_structure = [float(x) for x in obj.get("layer_structure") or [1, 2, 1]]
    dropout = obj.get("dropout_structure")
    # As the WebUI's `Hypernetwork.load`: a stored structure with a non-zero entry means dropout is used, whatever
    # `use_dropout` says; otherwise the stored flag (default off) decides.
    has_dropout = bool(dropout) and any(float(x) for x in dropout)
    use_dropout = True if has_dropout else bool(obj.get("use_dropout", False))
    last_layer_dropout = bool(obj.get("last_layer_dropout", False))
    if dropout is None:
        dropout = dropout_structure_for(layer_structure, use_dropout, last_layer_dropout)
    file = HypernetworkFile(
        name=_text(obj.get("name")) or source.stem, layers=layers, step=int(obj.get("step") or 0),
        layer_structure=layer_structure, activation_func=obj.get("activation_func"),
        is_layer_norm=bool(obj.get("is_layer_norm", False)),
        weight_initialization=str(obj.get("weight_initialization") or "Normal"),
        sd_checkpoint=_text(obj.get("sd_checkpoint")), sd_checkpoint_name=_text(obj.get("sd_checkpoint_name")),
        activate_output=bool(obj.get("activate_output", True)), use_dropout=use_dropout,
        dropout_structure=[float(x) for x in dropout], last_layer_dropout=last_layer_dropout,
        optional_info=_text(obj.get("optional_info")))
    file.validate()
    unknown = [k for k in obj if not isinstance(k, int) and k not in METADATA_KEYS]
    if unknown:
        logger.debug("%s: ignoring keys the WebUI does not read: %s", source, unknown)
    return file


def dropout_structure_for(layer_structure: list[float], use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """Default dropout per layer, as the WebUI's `parse_dropout_structure`: 0.3 on hidden layers when enabled."""
    count = len(layer_structure)
    if not use_dropout or count < 3:
        return [0.0] * count
    return [0.0, *([0.3] * (count - 3)), 0.3 if last_layer_dropout else 0.0, 0.0]


def fix_legacy_keys(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename early-WebUI keys `linear1.*`/`linear2.*` to `linear.0.*`/`linear.1.*` and make tensors float32."""
    fixed: StateDict = OrderedDict()
    for key, tensor in state.items():
        new_key = _LEGACY_KEY.sub(lambda m: f"linear.{int(m.group(1)) - 1}.", key)
        fixed[new_key] = tensor.detach().to("cpu", torch.float32) if isinstance(tensor, torch.Tensor) else tensor
    return fixed


def _check_module(name: str, size: int, which: str, state: Any, linear_count: int) -> None:
    """The Linear weights of one module must chain size -> ... -> size, one per layer_structure step."""
    if not isinstance(state, Mapping) or not state:
        raise ArtifactError(f"hypernetwork '{name}': module {size}/{which} must be a non-empty state dict")
    weights: dict[int, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _LINEAR_KEY.match(str(key))
        if match is None or not isinstance(tensor, torch.Tensor):
            raise ArtifactError(f"hypernetwork '{name}': module {size}/{which} has entry {key!r}; expected "
                                f"tensors named 'linear.<index>.weight' or 'linear.<index>.bias'")
        if match.group(2) == "weight" and tensor.ndim == 2:
            weights[int(match.group(1))] = tensor
    chain = [weights[i] for i in sorted(weights)]
    widths_ok = bool(chain) and chain[0].shape[1] == size and chain[-1].shape[0] == size and all(
        a.shape[0] == b.shape[1] for a, b in itertools.pairwise(chain))
    if len(chain) != linear_count or not widths_ok:
        shapes = [tuple(w.shape) for w in chain]
        raise ArtifactError(f"hypernetwork '{name}': module {size}/{which} has Linear weights {shapes}; they must "
                            f"be {linear_count} layers chaining {size} -> ... -> {size}")


def _plain_state(state: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Detached contiguous float32 CPU copies in an OrderedDict (allowed by the WebUI's unpickler)."""
    return OrderedDict((str(k), v.detach().to("cpu", torch.float32).contiguous().clone()) for k, v in state.items())


def _describe_other(obj: Any) -> str:
    if is_embedding(obj):
        return "this file is an embedding, not a hypernetwork"
    if isinstance(obj, Mapping) and any(isinstance(k, int) for k in obj):
        return "it has int size keys, but their values are not (k, v) pairs of state dicts"
    return describe_object(obj)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
