from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from finetune_core.errors import ConfigError
from finetune_core.methods import hypernetwork, textual_inversion
from finetune_core.methods.hypernetwork import HypernetworkConfig
from finetune_core.methods.textual_inversion import TextualInversionCreate
from finetune_core.model.interface import TextEncoderSpec
from finetune_core.train.memory import (
    ACTIVATION_VALUES_PER_CELL,
    GIB,
    MemoryNeeds,
    MemoryPlan,
    activation_bytes,
    estimate_memory,
    hypernetwork_parameters,
    model_parameters,
    unet_base_channels,
)


class TinyModel:
    """Just what the estimate reads: modules, text encoder widths, attention widths, latent layout, device."""

    latent_channels = 4
    vae_scale = 8
    text_encoders = (TextEncoderSpec("clip_l", 8),)
    device = torch.device("cpu")
    dtype = torch.float32
    context_width = 8

    def __init__(self) -> None:
        self.unet = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3), torch.nn.Linear(16, 16))  # 592 + 272
        self.text = torch.nn.Linear(8, 8)  # 72
        self.vae = torch.nn.Linear(4, 4)  # 20

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text}

    def attention_context_widths(self) -> dict[str, set[int]]:
        return {"cross": {8}, "self": {16}}

    def placement(self):
        return nullcontext()


def test_weights_are_counted_from_the_modules() -> None:
    model = TinyModel()
    assert model_parameters(model) == 592 + 272 + 72 + 20
    assert unet_base_channels(model) == 16


def test_textual_inversion_trains_only_its_vectors() -> None:
    model = TinyModel()
    needs = textual_inversion.memory_needs(model, TextualInversionCreate(num_vectors=3))  # type: ignore[arg-type]
    plan = MemoryPlan(batch_size=2, width=64, height=32, precision="fp16")
    est = estimate_memory(model, needs, plan, device_total=None)  # type: ignore[arg-type]
    trainable = 3 * 8
    assert needs == MemoryNeeds(trainable)
    assert est.parameters_bytes == 956 * 4 + trainable * 4  # frozen weights in the dtype the model holds (fp32)
    assert est.gradients_bytes == trainable * 4 and est.optimizer_bytes == trainable * 8
    assert est.activations_bytes == 2 * (8 * 4) * 16 * ACTIVATION_VALUES_PER_CELL * 2  # computed in fp16
    assert est.total == est.parameters_bytes + est.gradients_bytes + est.optimizer_bytes + est.activations_bytes
    assert est.suggestion == "" and "estimate" in est.describe()


def test_model_weights_that_train_count_once_in_fp32_and_hypernetwork_sizes() -> None:
    model = TinyModel()
    unet = 864
    est = estimate_memory(model, MemoryNeeds(unet, replaces_model_weights=True, extra_bytes=100),  # type: ignore[arg-type]
                          MemoryPlan(precision="bf16", width=64, height=64), device_total=None)
    # fp32 masters, plus the bf16 copy autocast caches of each trained weight for the forward and backward
    assert est.parameters_bytes == (956 - unet) * 4 + unet * 4 + unet * 2 and est.optimizer_bytes == unet * 8
    assert est.activations_bytes == 64 * 16 * ACTIVATION_VALUES_PER_CELL * 2 + 100
    fp32 = estimate_memory(model, MemoryNeeds(unet, replaces_model_weights=True),  # type: ignore[arg-type]
                           MemoryPlan(precision="fp32", width=64, height=64), device_total=None)
    assert fp32.parameters_bytes == 956 * 4  # no cast, so no copy
    # (1, 2, 1) on width 8: Linear(8,16) + Linear(16,8) = 144 + 136, for k and v.
    assert hypernetwork_parameters({8}, (1, 2, 1)) == 2 * (144 + 136)
    config = HypernetworkConfig(sizes="8, 16, 99")  # 99 matches no attention layer: it would never train
    assert hypernetwork.memory_needs(model, config).trainable == (  # type: ignore[arg-type]
        hypernetwork_parameters({8, 16}, (1, 2, 1)))


def test_a_plan_that_does_not_fit_gets_a_suggestion() -> None:
    model = TinyModel()
    plan = MemoryPlan(batch_size=4, width=1024, height=1024, precision="fp32")
    est = estimate_memory(model, MemoryNeeds(8), plan, device_total=GIB // 4)  # type: ignore[arg-type]
    assert est.total > GIB // 4
    assert "exceeds" in est.suggestion and "gradient checkpointing" in est.suggestion
    assert "fp16" in est.suggestion and "batch size" in est.suggestion
    checkpointed = activation_bytes(MemoryPlan(gradient_checkpointing=True), 320)
    assert checkpointed < activation_bytes(MemoryPlan(), 320)


def test_unknown_precision_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="precision"):
        estimate_memory(TinyModel(), MemoryNeeds(8), MemoryPlan(precision="fp8"), device_total=None)  # type: ignore[arg-type]


def test_cpu_device_total_comes_from_meminfo() -> None:
    est = estimate_memory(TinyModel(), MemoryNeeds(8), MemoryPlan(width=64, height=64))  # type: ignore[arg-type]
    assert est.device_total is None or est.device_total > 0


def test_optimizer_state_and_paired_batches() -> None:
    model = TinyModel()
    needs = MemoryNeeds(1000)
    sizes = {name: estimate_memory(model, needs, MemoryPlan(optimizer=name, momentum=momentum),  # type: ignore[arg-type]
                                   device_total=None).optimizer_bytes
             for name, momentum in (("adamw", 0), ("adamw8bit", 0), ("sgd", 0), ("lion", 0))}
    assert sizes == {"adamw": 8000, "adamw8bit": 2000, "sgd": 0, "lion": 4000}
    sgd = estimate_memory(model, needs, MemoryPlan(optimizer="sgd", momentum=0.9), device_total=None)  # type: ignore[arg-type]
    assert sgd.optimizer_bytes == 4000
    single = estimate_memory(model, needs, MemoryPlan(), device_total=None)  # type: ignore[arg-type]
    paired = estimate_memory(model, MemoryNeeds(1000, batch_factor=2), MemoryPlan(), device_total=None)  # type: ignore[arg-type]
    assert paired.activations_bytes == 2 * single.activations_bytes
    with pytest.raises(ConfigError, match="optimizer 'nope'"):
        estimate_memory(model, needs, MemoryPlan(optimizer="nope"), device_total=None)  # type: ignore[arg-type]
    big = MemoryNeeds(GIB, replaces_model_weights=True)
    tight = estimate_memory(model, big, MemoryPlan(), device_total=8 * GIB)  # type: ignore[arg-type]
    assert "adamw8bit" in tight.suggestion


def test_full_size_fits_say_which_cards_hold_a_run() -> None:
    """The full-size architectures counted on the meta device: a UNet-training run (batch 1, 512 px) in fp16 with
    8-bit AdamW and checkpointing fits SD1.5 on a 12 GB card but not on 8 GB, and SDXL on none below 24 GB."""
    from finetune_core.train.memory import describe_fits, full_size_fits

    def unet_needs(model) -> MemoryNeeds:
        unet = sum(p.numel() for p in model.trainable_modules()["unet"].parameters())
        return MemoryNeeds(unet, replaces_model_weights=True)

    plan = MemoryPlan(precision="fp16", gradient_checkpointing=True, optimizer="adamw8bit")
    estimates = full_size_fits(unet_needs, plan)
    unet15 = 859_520_964  # SD1.5's UNet, the figure every DreamBooth guide quotes as ~860M
    assert estimates["SD1.5"].gradients_bytes == unet15 * 4
    assert 8 * GIB < estimates["SD1.5"].total < 12 * GIB * 0.95
    assert estimates["SDXL"].total > 16 * GIB
    text = describe_fits(estimates)
    assert "SD1.5" in text and "fits 12, 16, 24 GB (not 8 GB)" in text and "SDXL" in text
