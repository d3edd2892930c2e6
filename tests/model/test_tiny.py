"""Tiny models: same weights every build, no zero-initialised layers, random norm affines, global RNG untouched."""

from __future__ import annotations

import pytest
import torch

from finetune_core.errors import FinetuneError
from finetune_core.model.tiny import tiny_components


@pytest.fixture(scope="module")
def sd1():
    return tiny_components("tiny-sd1")


def _modules(c):
    return [m for m in (c.unet, c.vae, c.text_encoder, c.text_encoder_2) if m is not None]


def test_same_weights_every_build_and_global_rng_untouched(sd1) -> None:
    state = torch.get_rng_state()
    again = tiny_components("tiny-sd1")
    assert torch.equal(state, torch.get_rng_state())
    assert again.identity == sd1.identity
    for first, second in zip(_modules(sd1), _modules(again)):
        for (name, p), (_, q) in zip(first.named_parameters(), second.named_parameters()):
            assert torch.equal(p, q), name


def test_names_differ(sd1) -> None:
    assert tiny_components("tiny-sd2").identity.shorthash != sd1.identity.shorthash


def test_no_zero_layers_and_random_norms(sd1) -> None:
    for module in _modules(sd1):
        for name, p in module.named_parameters():
            assert float(p.detach().abs().max()) > 0, name
        for sub in module.modules():
            if isinstance(sub, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                assert not torch.allclose(sub.weight, torch.ones_like(sub.weight))
                assert not torch.allclose(sub.bias, torch.zeros_like(sub.bias))
    ids = sd1.text_encoder.text_model.embeddings.position_ids
    assert torch.equal(ids[0], torch.arange(77))


def test_real_vocabulary_and_widths(sd1) -> None:
    assert sd1.text_encoder.get_input_embeddings().weight.shape == (49408, 768)
    assert sd1.unet.config.cross_attention_dim == 768


def test_unknown_name() -> None:
    with pytest.raises(FinetuneError, match="tiny-sd1"):
        tiny_components("tiny-sd3")
