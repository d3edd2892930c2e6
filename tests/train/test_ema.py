"""The loop's generic per-group mechanisms: moving averages (LitEma's warm-up, replacing every N steps, swapped in
for the artefact without copies, kept across a resume and a rollback), a gradient-norm limit per group, and a
group's learning-rate weight that survives schedule changes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_core.errors import ArtifactError
from finetune_core.methods.base import ParamGroup
from finetune_core.train.control import Control
from finetune_core.train.ema import ParameterAverages
from finetune_core.train.events import StepEvent
from finetune_core.train.loop import OutputSpec, resume_training, run_training
from finetune_core.train.optim import build_optimizer, clip_group_norms
from finetune_core.train.param_group import Averaging
from finetune_core.train.run_folder import RunFolder
from finetune_core.train.train_config import TrainConfig

from .fakes import FakeData, FakeMethod, FakeModel


def test_average_follows_and_replaces_every_n_steps() -> None:
    p = torch.zeros(2)
    averages = ParameterAverages([ParamGroup("a", [p], ema=Averaging(0.5, replace_every=2)), ParamGroup("b", [])])
    assert len(averages.tensors()) == 1  # only groups that ask for an average keep one
    p.fill_(4.0)
    averages.update(1)
    assert torch.equal(averages.tensors()[0], torch.full((2,), 2.0)) and torch.equal(p, torch.full((2,), 4.0))
    p.fill_(6.0)
    averages.update(2)  # avg = 0.5 * 2 + 0.5 * 6 = 4, and step 2 replaces the parameter with it
    assert torch.equal(p, torch.full((2,), 4.0))
    saved = averages.state_dict()
    fresh = ParameterAverages([ParamGroup("a", [torch.zeros(2)], ema=Averaging(0.5))])
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.tensors()[0], torch.full((2,), 4.0))
    with pytest.raises(ArtifactError, match="moving averages do not match"):
        ParameterAverages([]).load_state_dict(saved)



def test_warmup_follows_litema_and_the_decay_cap() -> None:
    p = torch.zeros(3)
    averages = ParameterAverages([ParamGroup("unet", [p], ema=Averaging(0.5, warmup=True))])
    expected = torch.zeros(3)
    for step, value in enumerate((1.0, 2.0, 4.0, 8.0), start=1):
        p.fill_(value)
        decay = min(0.5, (1 + step) / (10 + step))  # LitEma counts the update first: 2/11, 3/12, .., capped at 0.5
        averages.update(step)
        expected = decay * expected + (1 - decay) * value
        assert torch.allclose(averages.tensors()[0], expected)
    assert Averaging(0.5, warmup=True).decay_at(1) == pytest.approx(2 / 11) and Averaging(0.5).decay_at(1) == 0.5


def test_only_saved_averages_are_swapped_in_and_storage_is_put_back() -> None:
    kept, live = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    averages = ParameterAverages([ParamGroup("unet", [kept], ema=Averaging(0.9, on_cpu=True, saved=True)),
                                  ParamGroup("other", [live], ema=Averaging(0.9))])
    averages.tensors()[0].fill_(7.0)
    before = kept.data_ptr()
    with averages.swapped_in():
        assert torch.equal(kept.detach(), torch.full((2,), 7.0)) and kept.data_ptr() == averages.tensors()[0].data_ptr()
        assert torch.equal(live.detach(), torch.ones(2))  # not `saved`: the live weights stay
    assert kept.data_ptr() == before and torch.equal(kept.detach(), torch.ones(2))

def test_each_group_is_clipped_to_its_own_norm() -> None:
    a, b, c = (torch.zeros(2, requires_grad=True) for _ in range(3))
    for param, grad in ((a, [3.0, 4.0]), (b, [30.0, 40.0]), (c, [30.0, 40.0])):
        param.grad = torch.tensor(grad)
    optimizer = build_optimizer([ParamGroup("a", [a], clip_norm=1.0), ParamGroup("b", [b], clip_norm=10.0),
                                 ParamGroup("c", [c])], TrainConfig(), 0.1)
    clip_group_norms(optimizer)
    assert float(a.grad.norm()) == pytest.approx(1.0) and float(b.grad.norm()) == pytest.approx(10.0)
    assert float(c.grad.norm()) == pytest.approx(50.0)  # no limit: untouched


class TwoGroups(FakeMethod):
    """The fake vector split into two groups: the second with an lr weight, both with a norm limit and an EMA."""

    def trainable_parameters(self, model: Any) -> list[ParamGroup]:
        return [ParamGroup("first", [self.vector], clip_norm=0.5, ema=Averaging(0.6, replace_every=2)),
                ParamGroup("second", [self.second], lr_scale=0.25, clip_norm=0.5, ema=Averaging(0.8, replace_every=3))]

    def __init__(self) -> None:
        super().__init__(dropout=0.0)
        self.second = torch.full((8,), 0.2, requires_grad=True)

    def loss(self, model: Any, batch: Any) -> torch.Tensor:
        return super().loss(model, batch) + (self.second * self.vector).sum() ** 2


def _train(tmp: Path, config: TrainConfig, method: TwoGroups, **kwargs: Any) -> Any:
    return run_training(FakeModel(), method, FakeData(), config, RunFolder(tmp / "run"), OutputSpec(tmp / "out", "e"),
                        **kwargs)


def test_the_lr_weight_survives_every_schedule_change(tmp_path: Path) -> None:
    rates: list[list[float]] = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        rates.append([group["lr"] for group in self.param_groups])
        return original(self, *args, **kwargs)
    torch.optim.AdamW.step = spy  # type: ignore[method-assign]
    try:
        _train(tmp_path, TrainConfig(steps=6, learning_rate="0.1:2, 0.01:4, 0.001", save_every=0, preview_every=0,
                                     csv_every=0), TwoGroups())
    finally:
        torch.optim.AdamW.step = original  # type: ignore[method-assign]
    expected = [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    assert [r[0] for r in rates] == pytest.approx(expected)
    assert [r[1] for r in rates] == pytest.approx([0.25 * e for e in expected])


def test_resume_is_exact_with_averages_and_limits(tmp_path: Path) -> None:
    config = TrainConfig(steps=7, learning_rate="0.05", save_every=0, preview_every=0, csv_every=0)
    straight = TwoGroups()
    _train(tmp_path / "a", config, straight)
    control, stopped = Control(), TwoGroups()

    def stop(event: Any) -> None:
        if isinstance(event, StepEvent) and event.step == 4:
            control.interrupt()
    _train(tmp_path / "b", config, stopped, on_event=stop, control=control)
    resumed = TwoGroups()
    result = resume_training(FakeModel(), resumed, FakeData(), RunFolder(tmp_path / "b" / "run"),
                             OutputSpec(tmp_path / "b" / "out", "e", overwrite=True))
    assert result.step == 7
    assert torch.equal(resumed.vector.detach(), straight.vector.detach())
    assert torch.equal(resumed.second.detach(), straight.second.detach())


def test_a_rollback_restores_the_averages_too(tmp_path: Path) -> None:
    from finetune_core.train.guard import NanGuard

    method = TwoGroups()
    method.nan_calls = {4, 5, 6}  # steps 1-3 good, then three bad ones: back to the step-2 snapshot
    config = dataclasses.replace(TrainConfig(steps=5, learning_rate="0.05", save_every=0, preview_every=0,
                                             csv_every=0), nan_guard_snapshot_every=2)
    seen: list[list[torch.Tensor]] = []
    restored: list[list[torch.Tensor]] = []
    update, rollback = ParameterAverages.update, NanGuard.rollback

    def spy_update(self: ParameterAverages, step: int) -> None:
        update(self, step)
        seen.append([t.clone() for t in self.tensors()])

    def spy_rollback(self: NanGuard, params: list[torch.Tensor], *args: Any) -> int:
        step = rollback(self, params, *args)
        restored.append([t.clone() for t in params[2:]])  # the kept state: 2 parameters, then their averages
        return step
    ParameterAverages.update, NanGuard.rollback = spy_update, spy_rollback  # type: ignore[method-assign]
    try:
        _train(tmp_path, config, method)
    finally:
        ParameterAverages.update, NanGuard.rollback = update, rollback  # type: ignore[method-assign]
    assert len(restored) == 1 and len(restored[0]) == 2
    for now, at_two, at_three in zip(restored[0], seen[1], seen[2]):
        assert torch.equal(now, at_two) and not torch.equal(now, at_three)
