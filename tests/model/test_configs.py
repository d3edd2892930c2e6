"""The shipped full-size configs build the published architectures (parameter counts of SD1.5, SD2.1, SDXL-base)."""

from __future__ import annotations

import pytest
import torch

from finetune_core.errors import ConfigError
from finetune_core.model.configs import available_components, load_config
from tests.conftest import tiny_overrides


def n_params(family: str, component: str) -> int:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = load_config(family, component)
    with torch.device("meta"):  # shapes only: full-size models at no memory cost
        if component == "unet":
            model = UNet2DConditionModel.from_config(config)
        elif component == "vae":
            model = AutoencoderKL.from_config(config)
        else:
            with_projection = config["architectures"] == ["CLIPTextModelWithProjection"]
            model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(
                CLIPTextConfig.from_dict(config)
            )
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "family,component,count",
    [
        ("sd1", "unet", 859_520_964),
        ("sd1", "vae", 83_653_863),
        ("sd1", "text_encoder", 123_060_480),
        ("sd2", "unet", 865_910_724),
        ("sd2", "text_encoder", 340_387_840),
        ("sdxl", "unet", 2_567_463_684),
        ("sdxl", "vae", 83_653_863),
        ("sdxl", "text_encoder", 123_060_480),
        ("sdxl", "text_encoder_2", 694_659_840),
    ],
)
def test_full_size_parameter_counts(family, component, count):
    assert n_params(family, component) == count


def test_components_and_values():
    assert available_components("sdxl") == ["scheduler", "text_encoder", "text_encoder_2", "unet", "vae"]
    assert available_components("sd1") == ["scheduler", "text_encoder", "unet", "vae"]
    assert load_config("sdxl", "vae")["scaling_factor"] == 0.13025
    assert load_config("sd1", "vae")["scaling_factor"] == 0.18215
    assert load_config("sd2", "unet")["use_linear_projection"] is True
    for family in ("sd1", "sd2", "sdxl"):
        sched = load_config(family, "scheduler")
        assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"], sched["num_train_timesteps"]) == (
            0.00085,
            0.012,
            "scaled_linear",
            1000,
        )
    config = load_config("sd1", "unet")
    config["in_channels"] = 9
    assert load_config("sd1", "unet")["in_channels"] == 4  # each call is a fresh copy


def test_tiny_overrides_keep_the_topology():
    for family in ("sd1", "sd2", "sdxl"):
        tiny, full = tiny_overrides(family)["unet"], load_config(family, "unet")
        assert tiny["down_block_types"] == full["down_block_types"]
        assert tiny["up_block_types"] == full["up_block_types"]
        assert tiny["layers_per_block"] == full["layers_per_block"] == 2


def test_unknown_names():
    with pytest.raises(ConfigError, match="unknown model family 'sd3'"):
        load_config("sd3", "unet")
    with pytest.raises(ConfigError, match="no component 'text_encoder_2'"):
        load_config("sd1", "text_encoder_2")
