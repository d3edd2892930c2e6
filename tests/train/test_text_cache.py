"""The text cache as the loop uses it: one encode per prompt, batch encode when chunk counts differ."""

from __future__ import annotations

import torch

from finetune_core.data.cache import TextCache
from finetune_core.model.interface import TextConditioning

from .fakes import FakeModel


class ChunkyModel(FakeModel):
    """Prompts with "long" need two chunks; encoding a batch pads every row to the longest."""

    def encode_prompts(self, prompts: list[str], embeddings: object = None) -> TextConditioning:
        self.encoded.extend(prompts)
        chunks = 2 if any("long" in p for p in prompts) else 1
        return TextConditioning(torch.ones(len(prompts), 3 * chunks, 8) * len(prompts))


def test_each_prompt_is_encoded_once() -> None:
    model, cache = FakeModel(), TextCache()
    first = cache.encode(model, ["a", "b", "a"])
    again = cache.encode(model, ["b", "a"])
    assert model.encoded == ["a", "b"] and len(cache) == 2
    torch.testing.assert_close(again.context, first.context[[1, 0]])
    torch.testing.assert_close(first.context, model.encode_prompts(["a", "b", "a"]).context)


def test_prompts_of_different_lengths_are_encoded_together() -> None:
    model, cache = ChunkyModel(), TextCache()
    cond = cache.encode(model, ["short", "long one"])
    assert cond.context.shape == (2, 6, 8)
    assert model.encoded[-2:] == ["short", "long one"]  # the batch call, padded like the WebUI's
