"""Optimizer construction by name, learning-rate application and gradient clipping.

An unknown optimizer, or one whose package is missing, is a ConfigError: never a silent fallback to AdamW
(the WebUI's `hypernetwork.py` prints a line and falls back; we do not).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from finetune_core.errors import ConfigError
from finetune_core.train.lr_schedule import parse_schedule, rate_at
from finetune_core.train.param_group import ParamGroup
from finetune_core.train.train_config import OPTIONAL_OPTIMIZERS, TrainConfig

_DEFAULT_DECAY = {"adamw": 1e-2, "adamw8bit": 1e-2, "prodigy": 0.0, "lion": 0.0, "adam": 0.0, "sgd": 0.0}


def optimizer_class(name: str) -> Callable[..., torch.optim.Optimizer]:
    """The optimizer class for a config name; ConfigError when unknown or its package is not installed."""
    builtin: dict[str, Any] = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    if name in builtin:
        return builtin[name]
    if name not in OPTIONAL_OPTIMIZERS:
        known = ", ".join(list(builtin) + list(OPTIONAL_OPTIMIZERS))
        raise ConfigError(f"optimizer {name!r} is not known; choose one of {known}")
    module_name, class_name, package = OPTIONAL_OPTIMIZERS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"optimizer {name!r} needs the Python package {package!r}, which is not installed "
                          f"({exc}); install it (pip install {package}) or choose adamw") from None
    return getattr(module, class_name)


def build_optimizer(groups: list[ParamGroup], config: TrainConfig, base_lr: float) -> torch.optim.Optimizer:
    """An optimizer over the method's parameter groups; each group's lr is base_lr x its lr_scale."""
    cls = optimizer_class(config.optimizer)
    param_groups = []
    for group in groups:
        decay = config.weight_decay
        if decay is None:
            decay = group.weight_decay if group.weight_decay is not None else _DEFAULT_DECAY[config.optimizer]
        own = [list(segment) for segment in parse_schedule(group.learning_rate, config.steps,
                                                             f"{group.name} learning rate")] \
            if group.learning_rate else []
        param_groups.append({"params": list(group.params), "lr": base_lr * group.lr_scale,
                             "weight_decay": decay, "lr_scale": group.lr_scale, "name": group.name,
                             "schedule": own, "stop_step": group.stop_step,
                             "clip_norm": group.clip_norm})
    if config.optimizer == "sgd":
        return cls(param_groups, lr=base_lr, momentum=config.momentum)
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optimizer == "lion":
        return cls(param_groups, lr=base_lr, betas=betas)
    return cls(param_groups, lr=base_lr, betas=betas, eps=config.adam_epsilon)


def set_learning_rate(optimizer: torch.optim.Optimizer, rate: float, step: int = 0, factor: float = 1.0) -> None:
    """Write the rate of the step after `step` into every param group: the run's `rate` x the group's lr_scale (the
    WebUI writes one rate to all groups), or the group's own schedule x `factor` (the NaN guard's lowering).

    A group whose own schedule ran out, or past its stop step, is frozen: lr 0 and no gradients for its parameters,
    so backward skips it and the optimizer (which skips parameters without a gradient) leaves it as it is.
    """
    for group in optimizer.param_groups:
        own = group.get("schedule") or []
        group_rate: float | None = rate * group.get("lr_scale", 1.0)
        if own:
            own_rate = rate_at([(float(r), int(end)) for r, end in own], step)
            group_rate = None if own_rate is None else own_rate * factor
        stop = int(group.get("stop_step") or 0)
        active = group_rate is not None and not (stop and step >= stop)
        group["lr"] = group_rate if active and group_rate is not None else 0.0
        for param in group["params"]:
            if param.requires_grad != active:
                param.requires_grad_(active)
                param.grad = None


def clip_gradients(params: list[torch.Tensor], mode: str, value: float) -> None:
    """Clip gradients by value (`clip_grad_value_`) or by total norm (`clip_grad_norm_`), as the WebUI does."""
    if mode == "value":
        torch.nn.utils.clip_grad_value_(params, value)
    elif mode == "norm":
        torch.nn.utils.clip_grad_norm_(params, value)


def clip_group_norms(optimizer: torch.optim.Optimizer) -> None:
    """Clip each param group's gradient norm to its own `clip_norm` (`ParamGroup.clip_norm`; 0: not clipped)."""
    for group in optimizer.param_groups:
        limit = float(group.get("clip_norm") or 0.0)
        if limit > 0:
            torch.nn.utils.clip_grad_norm_(group["params"], limit)


def gradients_finite(params: list[torch.Tensor]) -> bool:
    """True when every gradient is finite (missing gradients count as finite)."""
    return all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
