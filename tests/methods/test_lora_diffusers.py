"""A LoRA file we write, loaded by diffusers' own `load_lora_weights` (kohya conversion + PEFT) on tiny pipelines,
gives the same UNet and text-encoder outputs as our application of the file: every key is taken, none dropped."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from finetune_core.model.tiny import build_tiny
from tests.methods.lora_files import our_network, outputs, random_lora_file

pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (the test extra installs it)")


def _scheduler():
    import diffusers

    return diffusers.DDIMScheduler(steps_offset=1, clip_sample=False)


def _pipeline(model):
    import diffusers

    if model.family == "sdxl":
        return diffusers.StableDiffusionXLPipeline(vae=model.vae, text_encoder=model._encoders[0],
                                                   text_encoder_2=model._encoders[1], tokenizer=None,
                                                   tokenizer_2=None, unet=model.unet,
                                                   scheduler=_scheduler())
    return diffusers.StableDiffusionPipeline(vae=model.vae, text_encoder=model._encoders[0], tokenizer=None,
                                             unet=model.unet, scheduler=_scheduler(),
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def _peft_layers(module: torch.nn.Module) -> int:
    return sum(1 for m in module.modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})) > 0)


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def test_diffusers_load_lora_weights_equals_our_application(name, tmp_path):
    model = build_tiny(name)
    path = random_lora_file(model, tmp_path / "style.safetensors")
    base = outputs(model)
    with model.weight_adapters(our_network(model, path).by_name()):
        ours = outputs(model)
    assert not torch.allclose(ours[1], base[1]) and not torch.allclose(ours[0], base[0])

    state = load_file(str(path))
    modules = len([k for k in state if k.endswith(".lora_down.weight")])
    pipe = _pipeline(model)
    pipe.load_lora_weights(dict(state))  # raises on any key its kohya converter leaves over
    loaded = sum(_peft_layers(m) for m in (model.unet, *model._encoders))
    assert loaded == modules  # every module of the file became a PEFT layer: none dropped
    theirs = outputs(model)
    torch.testing.assert_close(theirs[0], ours[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(theirs[1], ours[1], rtol=1e-4, atol=1e-5)
