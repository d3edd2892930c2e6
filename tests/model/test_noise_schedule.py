"""Noise-schedule maths: SD's schedule values and the eps / v / x0 identities."""

from __future__ import annotations

import pytest
import torch

from finetune_core.model.noise_schedule import (
    add_noise,
    predicted_x0,
    scaled_linear_alphas_cumprod,
    snr,
    velocity_target,
)


def test_scaled_linear_matches_stable_diffusion() -> None:
    ac = scaled_linear_alphas_cumprod()
    assert ac.shape == (1000,) and ac.dtype == torch.float32
    assert float(ac[0]) == pytest.approx(1 - 0.00085)
    assert float(((1 - ac[-1]) / ac[-1]).sqrt()) == pytest.approx(14.6146, rel=1e-4)  # SD's well-known sigma_max
    assert bool((ac[1:] < ac[:-1]).all())


@pytest.fixture
def tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g), torch.tensor([0, 500, 999]),
            scaled_linear_alphas_cumprod())


def test_add_noise_endpoints(tensors) -> None:
    x0, noise, t, ac = tensors
    noisy = add_noise(x0, noise, t, ac)
    a = ac[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    assert float((noisy[0] - x0[0]).abs().max()) < 0.1  # t=0 is almost clean
    assert float((noisy[2] - noise[2]).abs().max()) < 0.2  # t=999 is almost pure noise


def test_eps_prediction_recovers_x0(tensors) -> None:
    x0, noise, t, ac = tensors
    noisy = add_noise(x0, noise, t, ac)
    torch.testing.assert_close(predicted_x0(noisy, noise, t, ac, "epsilon"), x0, rtol=1e-3, atol=1e-3)


def test_v_prediction_recovers_x0(tensors) -> None:
    x0, noise, t, ac = tensors
    noisy = add_noise(x0, noise, t, ac)
    v = velocity_target(x0, noise, t, ac)
    a = ac[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0)
    torch.testing.assert_close(predicted_x0(noisy, v, t, ac, "v_prediction"), x0, rtol=1e-4, atol=1e-4)


def test_snr() -> None:
    ac = scaled_linear_alphas_cumprod()
    t = torch.tensor([0, 999])
    torch.testing.assert_close(snr(t, ac), ac[t] / (1 - ac[t]))
    assert float(snr(t, ac)[0]) > 1000 and float(snr(t, ac)[1]) < 0.01
