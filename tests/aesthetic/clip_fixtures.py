"""Tiny CLIP models built in code, saved the two ways users keep them: a transformers CLIP folder and an open_clip
weights file. The open_clip one comes with its own forward (written from open_clip's VisionTransformer), so a test
can compare our reading of its weights against features computed without our code."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

VISION_WIDTH, PATCH, IMAGE = 32, 8, 32
OPEN_CLIP_WIDTH = 64  # open_clip reads heads as width // 64 when no config says otherwise


def transformers_clip(folder: Path, text_width: int = 768, dim: int = 768, seed: int = 0,
                      image_size: int = IMAGE) -> Path:
    """A transformers CLIPModel folder (config.json, model.safetensors, preprocessor_config.json); the text tower is
    tiny but as wide as the SD text encoder, so its projection fits."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": text_width, "intermediate_size": 16, "num_hidden_layers": 1,
                     "num_attention_heads": text_width // 64, "vocab_size": 16, "max_position_embeddings": 8},
        vision_config={"hidden_size": VISION_WIDTH, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": PATCH},
        projection_dim=dim)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    processor.save_pretrained(folder)
    return folder


class Block(nn.Module):
    """open_clip's ResidualAttentionBlock (GELU), sequence-first as its Transformer runs it."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OpenClipVisual(nn.Module):
    """open_clip's VisionTransformer: patches, class token, positions, ln_pre, blocks, ln_post on the class token,
    then x @ proj."""

    def __init__(self, width: int = OPEN_CLIP_WIDTH, heads: int = 1, layers: int = 2, dim: int = 768) -> None:
        super().__init__()
        grid = IMAGE // PATCH
        self.conv1 = nn.Conv2d(3, width, PATCH, stride=PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, dim) * width ** -0.5)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = x.permute(1, 0, 2)
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(x.permute(1, 0, 2)[:, 0]) @ self.proj


def open_clip_file(path: Path, text_width: int = 768, dim: int = 768, seed: int = 0,
                   heads: int = 1) -> OpenClipVisual:
    """Write an open_clip-layout weights file (visual.*, text_projection, a text tower) to `path`; returns the
    image tower that computes the reference features."""
    torch.manual_seed(seed)
    visual = OpenClipVisual(heads=heads, dim=dim).eval()
    for module in visual.modules():
        if isinstance(module, nn.LayerNorm):  # random affine parameters, so a swapped pair would show
            nn.init.normal_(module.weight, 1.0, 0.2)
            nn.init.normal_(module.bias, 0.0, 0.2)
    sd = {f"visual.{k}": v.detach().clone() for k, v in visual.state_dict().items()}
    sd["text_projection"] = torch.randn(text_width, dim) * text_width ** -0.5
    sd["token_embedding.weight"] = torch.randn(16, text_width)
    sd["positional_embedding"] = torch.randn(8, text_width)
    sd["ln_final.weight"], sd["ln_final.bias"] = torch.ones(text_width), torch.zeros(text_width)
    sd["logit_scale"] = torch.tensor(4.6)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return visual
