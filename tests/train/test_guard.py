"""NaN guard unit behaviour: streak counting, rollback in place, giving up."""

from __future__ import annotations

import pytest
import torch

from finetune_core.errors import TrainingDiverged
from finetune_core.train.guard import GuardState, NanGuard
from finetune_core.train.step import make_grad_scaler


def test_rollback_restores_params_and_optimizer_and_lowers_the_rate() -> None:
    p = torch.ones(3, requires_grad=True)
    optimizer = torch.optim.Adam([p], lr=0.1)
    scaler = make_grad_scaler(torch.device("cpu"), "fp32")
    guard = NanGuard(GuardState(), bad_steps=2, max_rollbacks=1, lr_factor=0.5)
    guard.take_snapshot(7, [p], optimizer, scaler)
    p.grad = torch.ones(3)
    optimizer.step()
    assert not torch.equal(p.detach(), torch.ones(3))
    assert guard.record_bad() is False
    assert guard.record_bad() is True
    assert guard.rollback([p], optimizer, scaler) == 7
    assert torch.equal(p.detach(), torch.ones(3)) and optimizer.state_dict()["state"] == {}
    assert guard.state.lr_factor == 0.5 and guard.state.rollbacks == 1 and guard.state.bad_streak == 0
    guard.record_bad()
    with pytest.raises(TrainingDiverged, match="Lower the learning rate"):
        guard.record_bad()


def test_a_good_step_resets_the_streak() -> None:
    guard = NanGuard(GuardState(), bad_steps=2, max_rollbacks=1, lr_factor=0.5)
    guard.record_bad()
    guard.record_good()
    assert guard.record_bad() is False
