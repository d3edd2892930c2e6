"""The standalone sampler: diffusers schedulers under the WebUI's sampler names, checked against an oracle model
that knows the clean latents (every deterministic sampler must land on them, for eps and v models alike)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

from finetune_core.errors import ConfigError
from finetune_core.model.interface import EPSILON, V_PREDICTION, SampleRequest, TextConditioning
from finetune_core.model.noise_schedule import scaled_linear_alphas_cumprod
from finetune_core.model.sampler import SAMPLERS, check_request, sample


class Oracle:
    """Predicts the exact eps (or v) that leads back to fixed clean latents; decoding is the identity on 3 channels."""

    latent_channels = 4
    vae_scale = 8
    device = torch.device("cpu")

    def __init__(self, prediction_type: str) -> None:
        self.prediction_type = prediction_type
        self.x0 = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(7)).clamp(-0.9, 0.9)
        self.ac = scaled_linear_alphas_cumprod().double()

    def alphas_cumprod(self) -> torch.Tensor:
        return self.ac.float()

    def encode_prompts(self, prompts: list[str], embeddings: Any = None) -> TextConditioning:
        return TextConditioning(torch.zeros(len(prompts), 77, 8))

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: TextConditioning, size_cond: Any = None) -> torch.Tensor:
        a = self.ac[t.double().round().long()].reshape(-1, 1, 1, 1)
        x0 = self.x0.double().expand_as(x)
        eps = (x.double() - a.sqrt() * x0) / (1 - a).sqrt()
        out = eps if self.prediction_type == EPSILON else a.sqrt() * eps - (1 - a).sqrt() * x0
        return out.float()

    def decode_latents(self, latents: torch.Tensor, grad: bool = False) -> torch.Tensor:
        self.decoded = latents
        return torch.zeros(latents.shape[0], 3, 16, 16)

    def placement(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def context_transform(self, transform: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


@pytest.mark.parametrize("prediction", [EPSILON, V_PREDICTION])
@pytest.mark.parametrize("name", ["DPM++ 2M", "DPM++ 2M Karras", "Euler", "DDIM", "UniPC"])
def test_deterministic_samplers_reach_the_oracles_latents(name: str, prediction: str) -> None:
    model = Oracle(prediction)
    images = sample(model, SampleRequest(("a",), ("",), steps=20, cfg_scale=3.0, width=16, height=16,
                                         sampler=name))  # type: ignore[arg-type]
    assert len(images) == 1 and images[0].size == (16, 16)
    # DDIM, as SD's, ends at alphas_cumprod[0] = 0.99915, not 1: sqrt(1 - a0) ≈ 0.03 of noise stays.
    tolerance = 0.1 if name == "DDIM" else 2e-3
    torch.testing.assert_close(model.decoded, model.x0, atol=tolerance, rtol=0)


def test_request_problems_are_named_together() -> None:
    with pytest.raises(ConfigError) as error:
        check_request(SampleRequest(("a", "b"), ("",), steps=0, width=100, sampler="PLMS"))
    assert len(error.value.problems) == 4 and "multiples of 8" in str(error.value)
    assert "one per prompt" in str(error.value) and "DPM++ 2M" in str(error.value)


def test_every_listed_sampler_builds_with_the_model_prediction_type() -> None:
    from finetune_core.model.sampler import make_scheduler

    for name in SAMPLERS:
        scheduler = make_scheduler(name, V_PREDICTION)
        assert scheduler.config.prediction_type == V_PREDICTION and scheduler.config.num_train_timesteps == 1000
