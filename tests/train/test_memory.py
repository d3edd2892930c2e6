"""The peak-memory measurement (fake tensors, the real step code) and the fit planner, on tiny models."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from finetune_core.errors import ConfigError
from finetune_core.jobs.fit import Request, measure, parse_size, plan_fit
from finetune_core.train.memory import BlockwiseAdamState, Hardware, attention_kernel, fake_device

SMALL = {"data": {"width": 128, "height": 128}}


@pytest.mark.parametrize("method", ["textual-inversion", "dreambooth"])
def test_the_fake_measurement_equals_the_real_steps_count(method: str) -> None:
    request = Request(method, "tiny-sd1", SMALL, weights="fp32")
    fake = measure(request)
    real = measure(request, fake=False)
    assert fake.peak_bytes == pytest.approx(real.peak_bytes, rel=0.05)
    assert fake.by_category["weights"] == pytest.approx(real.by_category["weights"], rel=0.05)


def _attention_peak(kernel: str, tokens: int) -> int:
    """Peak bytes of one attention's forward and backward (8 heads of 64) on `tokens` tokens, fake fp16 tensors."""
    with fake_device() as tracker, attention_kernel(kernel):
        q = torch.randn(1, 8, tokens, 64, dtype=torch.float16, requires_grad=True)
        k = torch.randn(1, 8, tokens, 64, dtype=torch.float16, requires_grad=True)
        v = torch.randn(1, 8, tokens, 64, dtype=torch.float16, requires_grad=True)
        F.scaled_dot_product_attention(q, k, v).float().sum().backward()
        return tracker.peak


def test_attention_memory_is_linear_in_tokens_under_flash_and_quadratic_under_math() -> None:
    for kernel, growth in (("flash", 2.0), ("math", 4.0)):
        peaks = [_attention_peak(kernel, n) for n in (1024, 2048, 4096)]
        # doubling the tokens doubles what a linear kernel adds and quadruples what a quadratic one adds
        assert (peaks[2] - peaks[1]) / (peaks[1] - peaks[0]) == pytest.approx(growth, rel=0.1), kernel
    assert _attention_peak("math", 4096) > 8 * _attention_peak("flash", 4096)


def test_the_model_under_math_attention_takes_more_than_under_flash() -> None:
    request = Request("hypernetwork", "tiny-sd1", {"data": {"width": 256, "height": 256},
                                                   "train": {"gradient_checkpointing": False}})
    flash = measure(request).peak_bytes
    math = measure(dataclasses.replace(request, hardware=Hardware("math"))).peak_bytes
    assert math > 1.2 * flash


def test_gradient_checkpointing_lowers_activation_bytes() -> None:
    on = measure(Request("lora", "tiny-sd1", {**SMALL, "train": {"gradient_checkpointing": True}}))
    off = measure(Request("lora", "tiny-sd1", {**SMALL, "train": {"gradient_checkpointing": False}}))
    assert on.by_category["activations"] < 0.8 * off.by_category["activations"]


def test_8bit_adamw_keeps_a_quarter_of_adamws_state() -> None:
    params = [torch.nn.Parameter(torch.zeros(512, 512))]
    params[0].grad = torch.ones_like(params[0])
    adam = torch.optim.AdamW(params)
    adam.step()
    eight = BlockwiseAdamState(params)
    eight.step()

    def nbytes(opt: torch.optim.Optimizer) -> int:
        return sum(t.nbytes for s in opt.state.values() for t in s.values() if t.ndim)
    assert nbytes(eight) / nbytes(adam) == pytest.approx(0.25, rel=0.03)  # one byte per moment, plus block scales
    dreambooth = measure(Request("dreambooth", "tiny-sd1", {**SMALL, "train": {"optimizer": "adamw"}}))
    small = measure(Request("dreambooth", "tiny-sd1", {**SMALL, "train": {"optimizer": "adamw8bit"}}))
    assert small.by_category["optimizer"] < 0.35 * dreambooth.by_category["optimizer"]


def test_the_plan_for_a_run_that_does_not_fit_fits_by_the_same_measurement() -> None:
    request = Request("dreambooth", "tiny-sd1", {"data": {"width": 256, "height": 256, "batch_size": 2},
                                                 "train": {"gradient_checkpointing": False}})
    start = measure(request)
    target = int(start.peak_bytes * 0.7)
    plan = plan_fit(request, target, start)
    assert plan.changes and plan.peak_bytes <= target
    assert measure(plan.request).peak_bytes == plan.peak_bytes
    assert plan.changes[-1].peak_bytes == plan.peak_bytes


def test_a_plan_that_cannot_fit_says_the_smallest_peak_and_what_dominates() -> None:
    with pytest.raises(ConfigError, match=r"smallest peak reachable is .* GiB .*dominated by weights"):
        plan_fit(Request("textual-inversion", "tiny-sd1", SMALL), 1 << 20)


@pytest.mark.parametrize("text", ["8", "-1GB", "eight", "0GB", "8 parsecs"])
def test_a_size_without_a_unit_or_below_zero_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="is not a size"):
        parse_size(text)


def test_sizes() -> None:
    assert parse_size("8GB") == 8 << 30
    assert parse_size("7.5 GiB") == int(7.5 * (1 << 30))
    assert parse_size("6000MB") == 6000 << 20


def test_an_unknown_architecture_or_setting_is_refused() -> None:
    with pytest.raises(ConfigError, match="architecture 'sd3-full' is not known"):
        measure(Request("lora", "sd3-full"))
    with pytest.raises(ConfigError, match="num_vectors"):
        measure(Request("lora", "tiny-sd1", {"method": {"num_vectors": 4}}))


def test_the_cli_prints_the_measurement_and_the_plan_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    from finetune_core.cli import main

    assert main(["estimate", "textual-inversion", "--model", "tiny-sd1", "--width", "128", "--height", "128",
                 "--fit", "1GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peak_bytes"] == sum(out["by_category"].values())
    assert out["plan"] == [] and out["plan_peak_bytes"] == out["peak_bytes"]
    assert main(["estimate", "lora", "--model", "sd3-full"]) == 2
    assert "sd3-full" in capsys.readouterr().err
    assert main(["estimate", "lora", "--model", "tiny-sd1", "--fit", "eight"]) == 2


def test_a_half_model_trained_as_float32_masters_counts_the_masters_not_the_half_originals() -> None:
    from finetune_core.model.tiny import build_tiny

    unet = sum(p.numel() for p in build_tiny("tiny-sd1").unet.parameters())
    frozen = measure(Request("textual-inversion", "tiny-sd1", SMALL)).by_category["weights"]
    trained = measure(Request("dreambooth", "tiny-sd1", SMALL)).by_category["weights"]
    # fp16 -> float32 master: 2 more bytes per UNet value (4 more if the fp16 originals stayed on the device)
    assert (trained - frozen) / unet == pytest.approx(2.0, abs=0.2)


def test_a_fake_model_reused_across_measurements_measures_as_one_built_for_each() -> None:
    from finetune_core.jobs.fit import run_steps
    from finetune_core.model.full_size import fake_model

    requests = [Request(method, "tiny-sd1", SMALL) for method in
                ("dreambooth", "lora", "textual-inversion", "hypernetwork", "dreamartist", "dreambooth")]
    requests.append(Request("lora", "tiny-sd1", {**SMALL, "method": {"train_text_encoder": True},
                                                 "train": {"optimizer": "adamw8bit"}}))
    reused = [measure(request) for request in requests]  # one model serves all, DreamBooth's masters first
    from finetune_core.jobs.fit import _FAKE_MODELS

    model = _FAKE_MODELS.model("tiny-sd1", torch.float16)  # the one they used, left as it was found
    params = [p for m in [*model.trainable_modules().values(), model.vae] for p in m.parameters()]
    assert not any(p.requires_grad or p.grad is not None or getattr(p, "_post_accumulate_grad_hooks", None)
                   for p in params)
    assert {p.dtype for p in params} == {torch.float16}
    for request, measured in zip(requests, reused):
        fresh = run_steps(request, fake_device(), lambda dtype, r=request: fake_model(r.model, dtype))
        assert measured == fresh, request.method


def test_a_fake_model_has_the_tensors_of_the_model_it_stands_for() -> None:
    from finetune_core.model.full_size import fake_model
    from finetune_core.model.single_file import build_component
    from finetune_core.model.tiny import tiny_configs, tiny_spec

    def layout(modules: dict[str, torch.nn.Module]) -> dict[str, list[tuple[str, tuple[int, ...], torch.dtype]]]:
        return {key: [(name, tuple(t.shape), t.dtype) for name, t in
                      [*module.named_parameters(), *module.named_buffers()]] for key, module in modules.items()}

    built = {name: build_component(name, config).to(torch.float16)
             for name, config in tiny_configs(tiny_spec("tiny-sdxl")).items()}
    with fake_device():
        model = fake_model("tiny-sdxl", torch.float16)
        fake = {**model.trainable_modules(), "vae": model.vae}
    assert layout(fake) == layout(built)


@pytest.mark.parametrize("method, settings", [
    ("lora", {}),
    ("hypernetwork", {}),
    ("dreamartist", {}),
    ("dreambooth", {"data": {"width": 128, "height": 128, "batch_size": 2},
                    "train": {"gradient_accumulation": 2, "gradient_checkpointing": False, "optimizer": "adam"}}),
])
def test_8bit_adamw_computed_from_a_measurement_equals_measuring_it(method: str, settings: dict) -> None:
    from finetune_core.train.memory import with_8bit_adamw

    request = Request(method, "tiny-sd1", {**SMALL, **settings})
    computed = with_8bit_adamw(measure(request))
    measured = measure(request.with_settings("train", optimizer="adamw8bit"))
    assert computed is not None
    assert (computed.peak_bytes, computed.by_category) == (measured.peak_bytes, measured.by_category)
    assert with_8bit_adamw(measured) is None  # not from another optimizer


@pytest.mark.parametrize("method", ["lora", "textual-inversion", "dreamartist", "dreambooth"])
def test_medvram_computed_from_a_measurement_equals_measuring_it(method: str) -> None:
    from finetune_core.train.memory import with_8bit_adamw, with_medvram

    request = Request(method, "tiny-sd1", SMALL)
    medvram = dataclasses.replace(request, hardware=Hardware(residency="medvram"))
    measured = measure(request)
    for computed, expected in ((with_medvram(measured), measure(medvram)),
                               (with_medvram(with_8bit_adamw(measured)),  # type: ignore[arg-type]
                                measure(medvram.with_settings("train", optimizer="adamw8bit")))):
        assert computed is not None
        assert (computed.peak_bytes, computed.by_category) == (expected.peak_bytes, expected.by_category)
    assert measured.peak_bytes - measure(medvram).peak_bytes > 0  # the VAE at least leaves the device
    assert with_medvram(measure(medvram)) is None
