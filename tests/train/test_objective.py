"""Pure maths of the objective: forward process, targets, min-SNR weights, offset noise, weighted MSE."""

from __future__ import annotations

import torch

from finetune_core.train import objective
from finetune_core.train.randomness import generators


def schedule() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def test_training_target_follows_the_prediction_type() -> None:
    a = schedule()
    x0, eps, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([0, 999])
    assert objective.training_target("epsilon", x0, eps, t, a) is eps
    v = objective.training_target("v_prediction", x0, eps, t, a)
    for i in range(2):
        at = a[t[i]]
        torch.testing.assert_close(v[i], at.sqrt() * eps[i] - (1 - at).sqrt() * x0[i])


def test_min_snr_weights() -> None:
    a = schedule()
    t = torch.tensor([10, 500, 990])
    s = a[t] / (1 - a[t])
    eps_w = objective.min_snr_weights(t, a, 5.0, "epsilon")
    v_w = objective.min_snr_weights(t, a, 5.0, "v_prediction")
    torch.testing.assert_close(eps_w, torch.minimum(s, torch.tensor(5.0)) / s)
    torch.testing.assert_close(v_w, torch.minimum(s, torch.tensor(5.0)) / (s + 1))
    assert eps_w[0] < 1 and eps_w[2] == 1  # low t: high SNR is clipped; high t: SNR < gamma keeps weight 1


def test_noise_offset_adds_a_per_channel_constant() -> None:
    shape = (2, 4, 5, 5)
    plain = objective.sample_noise(shape, generators(3, "noise", range(2)))
    offset = objective.sample_noise(shape, generators(3, "noise", range(2)), offset=0.1)
    diff = offset - plain
    assert diff.abs().max() > 0
    torch.testing.assert_close(diff, diff[:, :, :1, :1].expand_as(diff))


def test_noise_and_timesteps_are_deterministic_per_sample() -> None:
    a = objective.sample_noise((2, 4, 2, 2), generators(1, "noise", range(2)))
    b = objective.sample_noise((1, 4, 2, 2), generators(1, "noise", range(1, 2)))
    torch.testing.assert_close(a[1:], b)
    t = objective.sample_timesteps(generators(1, "t", range(64)), 1000)
    assert t.dtype == torch.int64 and 0 <= int(t.min()) and int(t.max()) < 1000 and len(set(t.tolist())) > 30


def test_weighted_mse_is_fp32_per_sample_then_weighted() -> None:
    pred = torch.randn(2, 4, 3, 3).half()
    target = torch.randn(2, 4, 3, 3)
    plain = objective.weighted_mse(pred, target)
    assert plain.dtype == torch.float32
    torch.testing.assert_close(plain, ((pred.float() - target) ** 2).mean())
    weight = torch.rand(2, 1, 3, 3)
    snr_w = torch.tensor([0.5, 2.0])
    got = objective.weighted_mse(pred, target, weight, snr_w)
    per_sample = (((pred.float() - target) ** 2) * weight).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, (per_sample * snr_w).mean())
