"""The exponential moving average of trained weights: LitEma's warm-up, swapping in without copies, state."""

from __future__ import annotations

import pytest
import torch

from finetune_core.train.ema import ParameterEMA


def test_updates_follow_litema_warmup_and_the_decay_cap() -> None:
    p = torch.zeros(3)
    ema = ParameterEMA([p], decay=0.5)
    expected = torch.zeros(3)
    for n, value in enumerate((1.0, 2.0, 4.0, 8.0)):
        p.fill_(value)
        decay = min(0.5, (1 + n) / (10 + n))  # 0.1, 0.18.., then capped at 0.5 once the ramp passes it
        assert ema.current_decay() == pytest.approx(decay)
        ema.update([p])
        expected = decay * expected + (1 - decay) * value
        assert torch.allclose(ema.averages[0], expected)
    assert ema.updates == 4


def test_swapped_in_exchanges_storage_and_puts_it_back() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    ema = ParameterEMA([p], decay=0.9, device="cpu")
    ema.averages[0].fill_(7.0)
    before = p.data_ptr()
    with ema.swapped_in([p]):
        assert torch.equal(p.detach(), torch.full((2,), 7.0)) and p.data_ptr() == ema.averages[0].data_ptr()
    assert p.data_ptr() == before and torch.equal(p.detach(), torch.ones(2))


def test_state_round_trip() -> None:
    p = torch.arange(4.0)
    ema = ParameterEMA([p], decay=0.99)
    ema.update([p * 2])
    again = ParameterEMA([torch.zeros(4)], decay=0.99)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 1 and torch.equal(again.averages[0], ema.averages[0])
