"""The hypernetwork's modules, built exactly as the WebUI builds them (webui-integration.md §5.4, methods.md §3.3).

A module is a residual MLP `x + MLP(x) * multiplier`; a hypernetwork holds a (k, v) pair of them per context width.
The Sequential's numbering (`linear.<index>`) counts activations, LayerNorms and Dropouts, as the WebUI's does, so
state dicts are interchangeable with WebUI files.
"""

from __future__ import annotations

import inspect
import warnings
from typing import cast

import torch
from torch import nn

from finetune_core.errors import ConfigError

WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
_HIDDEN_ACTIVATIONS = {"hardswish", "multiheadattention"}  # the WebUI hides these from its list
MAX_MULTIPLIER = 16.0  # a layer's width as a multiple of the attention width
MAX_LAYERS = 16


def activation_classes() -> dict[str, type[nn.Module] | None]:
    """The WebUI's activation names: its own (`swish` = Hardswish) plus every torch activation, lowercased."""
    named: dict[str, type[nn.Module] | None] = {
        "linear": None, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
        "swish": nn.Hardswish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    }
    for cls_name, cls in vars(torch.nn.modules.activation).items():
        if inspect.isclass(cls) and issubclass(cls, nn.Module) and cls.__module__ == "torch.nn.modules.activation":
            named.setdefault(cls_name.lower(), cls)
    return named


def activation_choices() -> list[str]:
    """Activation names offered to users: the WebUI's list (it hides hardswish and multiheadattention) less those a
    module cannot be built with (see `_keeps_width`)."""
    return [name for name, cls in activation_classes().items()
            if name not in _HIDDEN_ACTIVATIONS and _keeps_width(cls)]


def _keeps_width(cls: type[nn.Module] | None) -> bool:
    """True when the activation builds without arguments and keeps a layer's width (glu halves it; softmax2d wants
    images; threshold needs its arguments): the WebUI offers them all and then fails with a traceback."""
    if cls is None:
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # softmax & co. warn about their implicit dimension
            return tuple(cls()(torch.zeros(2, 3, 8)).shape) == (2, 3, 8)
    except Exception:  # a constructor without defaults, or a forward for other shapes: not usable here
        return False


def structure_problems(layer_structure: list[float], dropout_structure: list[float] | None,
                       activation: str, weight_init: str) -> list[str]:
    """Every reason the WebUI would refuse these module settings, as sentences."""
    problems = []
    if len(layer_structure) < 2 or layer_structure[0] != 1 or layer_structure[-1] != 1:
        problems.append(f"layer structure {_fmt(layer_structure)} must start and end with 1, e.g. '1, 2, 1'")
    if any(v <= 0 for v in layer_structure):
        problems.append(f"layer structure {_fmt(layer_structure)} must have only positive multipliers")
    if any(v > MAX_MULTIPLIER for v in layer_structure) or len(layer_structure) > MAX_LAYERS:
        problems.append(f"layer structure {_fmt(layer_structure)} is too large: at most {MAX_LAYERS} layers, each at "
                        f"most {MAX_MULTIPLIER:g} times the attention width (the WebUI's are like '1, 2, 1'; one layer "
                        f"of {MAX_MULTIPLIER:g} already has millions of weights per attention layer)")
    if dropout_structure is not None:
        if len(dropout_structure) != len(layer_structure):
            problems.append(f"dropout structure {_fmt(dropout_structure)} needs one value per layer "
                            f"({len(layer_structure)})")
        elif dropout_structure[0] != 0 or dropout_structure[-1] != 0:
            problems.append(f"dropout structure {_fmt(dropout_structure)} must start and end with 0")
        if any(not 0 <= p < 1 for p in dropout_structure):
            problems.append(f"dropout probabilities {_fmt(dropout_structure)} must be in [0, 1)")
    if activation not in activation_classes():
        problems.append(f"unknown activation function {activation!r}; choose one of {', '.join(activation_choices())}")
    elif not _keeps_width(activation_classes()[activation]):
        problems.append(f"the activation function {activation!r} cannot be used in a hypernetwork (it needs arguments "
                        f"or changes the layer's width); choose one of {', '.join(activation_choices())}")
    if weight_init not in WEIGHT_INITS:
        problems.append(f"unknown weight initialization {weight_init!r}; choose one of {', '.join(WEIGHT_INITS)}")
    return problems


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


class HypernetworkModule(nn.Module):
    """One residual MLP; the attribute is named `linear` because WebUI state dict keys are `linear.<i>.*`."""

    def __init__(self, dim: int, layer_structure: list[float], activation: str = "linear",
                 weight_init: str = "Normal", add_layer_norm: bool = False, activate_output: bool = False,
                 dropout_structure: list[float] | None = None) -> None:
        super().__init__()
        problems = structure_problems(layer_structure, dropout_structure, activation, weight_init)
        if problems:
            raise ConfigError(problems)
        self.multiplier = 1.0
        activation_cls = activation_classes()[activation]
        dropouts = dropout_structure or [0.0] * len(layer_structure)
        layers: list[nn.Module] = []
        for i in range(len(layer_structure) - 1):
            width_in, width_out = int(dim * layer_structure[i]), int(dim * layer_structure[i + 1])
            layers.append(nn.Linear(width_in, width_out))
            is_last = i == len(layer_structure) - 2
            if activation_cls is not None and (not is_last or activate_output):
                layers.append(activation_cls())
            if add_layer_norm:
                layers.append(nn.LayerNorm(width_out))
            if dropouts[i + 1] > 0:
                layers.append(nn.Dropout(p=dropouts[i + 1]))
        self.linear = nn.Sequential(*layers)
        self._initialise(weight_init, activation)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype inputs are cast to: that of the first Linear (the Sequential always starts with one)."""
        return cast(nn.Linear, self.linear[0]).weight.dtype

    def _initialise(self, weight_init: str, activation: str) -> None:
        nonlinearity = "leaky_relu" if activation == "leakyrelu" else "relu"
        for layer in self.linear:
            if isinstance(layer, nn.LayerNorm):  # the WebUI always gives LayerNorms the Normal init
                nn.init.normal_(layer.weight, mean=0.0, std=0.01)
                nn.init.zeros_(layer.bias)
            elif isinstance(layer, nn.Linear):
                _init_linear(layer.weight, weight_init, nonlinearity)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 if self.training else self.multiplier
        return x + self.linear(x) * scale


def _init_linear(weight: torch.Tensor, weight_init: str, nonlinearity: str) -> None:
    # Draws from the global RNG (torch 2.1, the WebUI's, has no `generator=` here); callers seed it in a fork_rng.
    if weight_init == "Normal":
        nn.init.normal_(weight, mean=0.0, std=0.01)
    elif weight_init == "XavierUniform":
        nn.init.xavier_uniform_(weight)
    elif weight_init == "XavierNormal":
        nn.init.xavier_normal_(weight)
    elif weight_init == "KaimingUniform":
        nn.init.kaiming_uniform_(weight, nonlinearity=nonlinearity)  # type: ignore[arg-type]  # torch's Literal lists fewer names than it accepts
    else:
        nn.init.kaiming_normal_(weight, nonlinearity=nonlinearity)  # type: ignore[arg-type]  # torch's Literal lists fewer names than it accepts
