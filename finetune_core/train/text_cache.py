"""Per-run cache of prompt conditionings for methods whose text encoders stay frozen (`Method.caches_text`)."""

from __future__ import annotations

import torch

from finetune_core.model.interface import DiffusionModel, TextConditioning


class TextCache:
    """Encodes each distinct prompt once, without gradients, and serves batches from the cache."""

    def __init__(self) -> None:
        self._rows: dict[str, TextConditioning] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def encode(self, model: DiffusionModel, prompts: list[str]) -> TextConditioning:
        """The conditioning of `prompts`, encoding only the ones not seen before."""
        # one prompt at a time: encoded together, a short prompt would be padded to the longest one's chunks
        for prompt in dict.fromkeys(p for p in prompts if p not in self._rows):
            with torch.no_grad():
                self._rows[prompt] = model.encode_prompts([prompt])
        parts = [self._rows[p] for p in prompts]
        if len({part.context.shape[1] for part in parts}) > 1:
            # prompts of different chunk counts: the model pads them to one length when encoded together
            with torch.no_grad():
                return model.encode_prompts(prompts)
        return TextConditioning.cat(parts)
