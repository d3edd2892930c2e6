"""Tiny random text encoders shaped like the ones SD2 and SDXL models hold in the WebUI.

- `OpenCLIPText`: the text half of an open_clip `CLIP` (`token_embedding`, `positional_embedding`,
  `transformer.resblocks`, `ln_final`, `text_projection`, `attn_mask`), run sequence-first as open_clip does.
- `FrozenOpenCLIPEmbedder`: ldm's SD2 embedder (`.model`, layer "penultimate" = `layer_idx` 1, ln_final applied).
- `FrozenOpenCLIPEmbedder2`: sgm's SDXL OpenCLIP-bigG embedder (penultimate without ln_final, plus the pooled,
  projected EOS vector), with the sgm `AbstractEmbModel` attributes.
- `FrozenCLIPEmbedder`: sgm's SDXL CLIP-L embedder (transformers CLIPTextModel, layer "hidden").
Widths and the vocabulary are real (768 / 1024 / 1280, 49408 ids); depth is 2 layers.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from tiny_webui_model import FrozenCLIPEmbedder as _LdmFrozenCLIPEmbedder
from torch import nn

from finetune_core.model.tokenizer import ClipTokenizer

VOCAB = 49408
CONTEXT = 77
LAYERS = 2


class OpenCLIPTokenizer:
    """open_clip's `tokenizer._tokenizer` (SimpleTokenizer) as the WebUI uses it: `.encoder`, `.encode`."""

    def __init__(self):
        self._tok = ClipTokenizer()
        self.encoder = dict(self._tok._encoder)
        self.encoder["<start_of_text>"] = self._tok.bos_id
        self.encoder["<end_of_text>"] = self._tok.eos_id

    def encode(self, text):
        return self._tok.encode(text)


def tokenize(tokenizer, texts, context_length=CONTEXT):
    """open_clip.tokenize: start + ids + end, truncated to 77, padded with 0."""
    start, end = tokenizer.encoder["<start_of_text>"], tokenizer.encoder["<end_of_text>"]
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [start] + tokenizer.encode(text) + [end]
        ids = ids[:context_length]
        ids[-1] = end
        result[i, :len(ids)] = torch.tensor(ids)
    return result


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, mlp_width=64):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, mlp_width)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(mlp_width, width))]))

    def forward(self, x, attn_mask=None):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask.to(x.dtype))[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])


class OpenCLIPText(nn.Module):
    """The text tower of open_clip's CLIP (the visual tower is deleted by the embedders, as in ldm/sgm)."""

    def __init__(self, width, projection_dim=None, layers=LAYERS, heads=2):
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB, width)
        self.positional_embedding = nn.Parameter(torch.randn(CONTEXT, width) * 0.01)
        self.transformer = Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, projection_dim or width) * width ** -0.5)
        mask = torch.full((CONTEXT, CONTEXT), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        # Random LayerNorm affine parameters (ARCHITECTURE.md, tiny-model traps).
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.normal_(module.weight, 1.0, 0.3)
                nn.init.normal_(module.bias, 0.2, 0.3)


class FrozenOpenCLIPEmbedder(nn.Module):
    """ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder (SD2: ViT-H-14 text tower, width 1024)."""

    LAYERS = ("last", "penultimate")

    def __init__(self, width=1024, layer="penultimate"):
        super().__init__()
        self.model = OpenCLIPText(width)
        self.tokenizer = OpenCLIPTokenizer()
        self.max_length = CONTEXT
        self.layer = layer
        self.layer_idx = 0 if layer == "last" else 1

    def forward(self, text):
        tokens = tokenize(self.tokenizer, text)
        return self.encode_with_transformer(tokens.to(self.model.positional_embedding.device))

    def encode_with_transformer(self, text):
        x = self.model.token_embedding(text) + self.model.positional_embedding
        x = x.permute(1, 0, 2)
        x = self.text_transformer_forward(x, attn_mask=self.model.attn_mask)
        x = x.permute(1, 0, 2)
        return self.model.ln_final(x)

    def text_transformer_forward(self, x, attn_mask=None):
        for i, r in enumerate(self.model.transformer.resblocks):
            if i == len(self.model.transformer.resblocks) - self.layer_idx:
                break
            x = r(x, attn_mask=attn_mask)
        return x

    def encode(self, text):
        return self(text)


class _EmbModel:
    """sgm AbstractEmbModel attributes (GeneralConditioner reads them)."""

    is_trainable = False
    ucg_rate = 0.0
    legacy_ucg_val = None


class FrozenOpenCLIPEmbedder2(_EmbModel, nn.Module):
    """sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2 (SDXL: OpenCLIP ViT-bigG text tower, width 1280)."""

    def __init__(self, width=1280, layer="penultimate", always_return_pooled=True, legacy=False):
        super().__init__()
        self.model = OpenCLIPText(width, projection_dim=width)
        self.tokenizer = OpenCLIPTokenizer()
        self.input_key = "txt"
        self.max_length = CONTEXT
        self.layer = layer
        self.layer_idx = 0 if layer == "last" else 1
        self.return_pooled = always_return_pooled
        self.legacy = legacy

    def forward(self, text):
        tokens = tokenize(self.tokenizer, text)
        z = self.encode_with_transformer(tokens.to(self.model.positional_embedding.device))
        if not self.return_pooled and self.legacy:
            return z
        if self.return_pooled:
            return z[self.layer], z["pooled"]
        return z[self.layer]

    def encode_with_transformer(self, text):
        x = self.model.token_embedding(text) + self.model.positional_embedding
        x = x.permute(1, 0, 2)
        outputs = self.text_transformer_forward(x, attn_mask=self.model.attn_mask)
        outputs["pooled"] = self.pool(self.model.ln_final(outputs["last"]), text)
        return outputs

    def pool(self, x, text):
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.model.text_projection

    def text_transformer_forward(self, x, attn_mask=None):
        outputs = {}
        for i, r in enumerate(self.model.transformer.resblocks):
            if i == len(self.model.transformer.resblocks) - 1:
                outputs["penultimate"] = x.permute(1, 0, 2)
            x = r(x, attn_mask=attn_mask)
        outputs["last"] = x.permute(1, 0, 2)
        return outputs


class FrozenCLIPEmbedder(_EmbModel, _LdmFrozenCLIPEmbedder):
    """sgm.modules.encoders.modules.FrozenCLIPEmbedder for SDXL's CLIP-L: layer "hidden", the penultimate layer."""

    def __init__(self):
        super().__init__(width=768, layer="hidden", layer_idx=LAYERS - 1)
        self.input_key = "txt"
        self.return_pooled = False
