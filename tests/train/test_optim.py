"""Optimizer factory, learning-rate writing and clipping."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from finetune_core.errors import ConfigError
from finetune_core.methods.base import ParamGroup
from finetune_core.train.optim import build_optimizer, clip_gradients, gradients_finite, set_learning_rate
from finetune_core.train.train_config import TrainConfig


def groups() -> list[ParamGroup]:
    return [ParamGroup("a", [torch.zeros(3, requires_grad=True)]),
            ParamGroup("b", [torch.zeros(2, requires_grad=True)], lr_scale=0.5, weight_decay=0.0)]


@pytest.mark.parametrize(("name", "cls"), [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                                           ("sgd", torch.optim.SGD)])
def test_builtin_optimizers(name: str, cls: type) -> None:
    optimizer = build_optimizer(groups(), TrainConfig(optimizer=name), 0.1)
    assert isinstance(optimizer, cls)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.05])
    set_learning_rate(optimizer, 0.01)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.005])


def test_weight_decay_precedence() -> None:
    default = build_optimizer(groups(), TrainConfig(), 0.1)
    assert [g["weight_decay"] for g in default.param_groups] == [1e-2, 0.0]  # optimizer default, method's choice
    chosen = build_optimizer(groups(), TrainConfig(weight_decay=0.3), 0.1)
    assert [g["weight_decay"] for g in chosen.param_groups] == [0.3, 0.3]


def test_unknown_optimizer_is_refused() -> None:
    with pytest.raises(ConfigError, match="'rmsprop' is not known"):
        build_optimizer(groups(), TrainConfig(optimizer="rmsprop"), 0.1)


@pytest.mark.parametrize(("name", "module"), [("prodigy", "prodigyopt"), ("lion", "lion_pytorch"),
                                              ("adamw8bit", "bitsandbytes")])
def test_missing_optional_package_is_a_config_error(name: str, module: str) -> None:
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    with pytest.raises(ConfigError, match="not installed"):
        build_optimizer(groups(), TrainConfig(optimizer=name), 0.1)


def test_clipping_by_value_and_norm() -> None:
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.tensor([3.0, -4.0, 0.05, 0.0])
    clip_gradients([p], "value", 0.1)
    assert torch.equal(p.grad, torch.tensor([0.1, -0.1, 0.05, 0.0]))
    p.grad = torch.tensor([3.0, -4.0, 0.0, 0.0])
    clip_gradients([p], "norm", 1.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    assert gradients_finite([p])
    p.grad[0] = float("inf")
    assert not gradients_finite([p])


def test_a_group_with_its_own_schedule_or_stop_step_freezes_when_it_ends() -> None:
    own = ParamGroup("te", [torch.zeros(2, requires_grad=True)], learning_rate="0.3:2, 0.1:4")
    stopped = ParamGroup("stop", [torch.zeros(2, requires_grad=True)], lr_scale=2.0, stop_step=3)
    optimizer = build_optimizer([*groups(), own, stopped], TrainConfig(steps=10), 0.1)
    rates = []
    for step in range(6):
        set_learning_rate(optimizer, 0.01, step, factor=0.5)
        rates.append([g["lr"] for g in optimizer.param_groups])
        flags = [g["params"][0].requires_grad for g in optimizer.param_groups]
        assert flags == [True, True, step < 4, step < 3]
    # the run's rate for a and b (x lr_scale); te its own schedule x the guard factor; stop x2 until step 3
    assert rates[0] == pytest.approx([0.01, 0.005, 0.15, 0.02])
    assert rates[2] == pytest.approx([0.01, 0.005, 0.05, 0.02])
    assert rates[3] == pytest.approx([0.01, 0.005, 0.05, 0.0])
    assert rates[4] == pytest.approx([0.01, 0.005, 0.0, 0.0])


def test_a_frozen_group_gets_no_gradient_and_is_not_stepped() -> None:
    keep = torch.ones(2, requires_grad=True)
    frozen = torch.ones(2, requires_grad=True)
    optimizer = build_optimizer([ParamGroup("keep", [keep]), ParamGroup("te", [frozen], stop_step=1)],
                                TrainConfig(steps=5), 0.1)
    set_learning_rate(optimizer, 0.1, step=1)
    ((keep + frozen) ** 2).sum().backward()
    optimizer.step()
    assert frozen.grad is None and torch.equal(frozen.detach(), torch.ones(2))  # weight decay did not touch it
    assert not torch.equal(keep.detach(), torch.ones(2))
