"""Stand-in for modules/sd_hijack_open_clip.py: the WebUI wrappers around ldm's / sgm's OpenCLIP embedders."""

from __future__ import annotations

import torch

from modules import devices, sd_hijack_clip


def _tokenizer(wrapped):
    # The WebUI uses the module-level open_clip tokenizer; the tiny embedders carry an equivalent one.
    return wrapped.tokenizer


class FrozenOpenCLIPEmbedderWithCustomWords(sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase):
    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        encoder = _tokenizer(wrapped).encoder
        self.comma_token = encoder.get(",</w>")
        self.id_start = encoder["<start_of_text>"]
        self.id_end = encoder["<end_of_text>"]
        self.id_pad = 0

    def tokenize(self, texts):
        return [_tokenizer(self.wrapped).encode(text) for text in texts]

    def encode_with_transformers(self, tokens):
        return self.wrapped.encode_with_transformer(tokens)

    def encode_embedding_init_text(self, init_text, nvpt):
        # As in the WebUI: every token of init_text (nvpt is ignored), ids on devices.device.
        ids = _tokenizer(self.wrapped).encode(init_text)
        ids = torch.asarray([ids], device=devices.device, dtype=torch.int)
        return self.wrapped.model.token_embedding.wrapped(ids).squeeze(0)


class FrozenOpenCLIPEmbedder2WithCustomWords(sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase):
    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        encoder = _tokenizer(wrapped).encoder
        self.comma_token = encoder.get(",</w>")
        self.id_start = encoder["<start_of_text>"]
        self.id_end = encoder["<end_of_text>"]
        self.id_pad = 0

    def tokenize(self, texts):
        return [_tokenizer(self.wrapped).encode(text) for text in texts]

    def encode_with_transformers(self, tokens):
        d = self.wrapped.encode_with_transformer(tokens)
        z = d[self.wrapped.layer]
        pooled = d.get("pooled")
        if pooled is not None:
            z.pooled = pooled
        return z

    def encode_embedding_init_text(self, init_text, nvpt):
        ids = _tokenizer(self.wrapped).encode(init_text)
        weight = self.wrapped.model.token_embedding.wrapped.weight
        ids = torch.asarray([ids], device=devices.device, dtype=torch.int)
        return self.wrapped.model.token_embedding.wrapped(ids.to(weight.device)).squeeze(0)
