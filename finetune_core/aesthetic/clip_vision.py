"""The CLIP model the user names, as aesthetic embeddings need it: the image tower with its projection (image
features in CLIP's joint space) and the text projection into that space. transformers is imported when a model is
loaded, never at import time; only the parts needed are read (no text tower). The built-in names (`tiny_clip`) are
built in code instead of read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from finetune_core.aesthetic.tiny_clip import is_tiny_clip, tiny_clip_parts, tiny_clip_projection, tiny_clip_spec
from finetune_core.errors import ArtifactError
from finetune_core.formats.clip_weights import (
    WHAT_TO_PUT,
    ClipFiles,
    Preprocess,
    find_clip_files,
    preprocess_settings,
    read_clip_tensors,
    vision_settings,
)


class ClipImageTower:
    """Image features of the user's CLIP (`features`), and its text projection (text width C -> joint width D)."""

    def __init__(self, files: ClipFiles, vision: Any, text_projection: torch.Tensor, preprocess: Preprocess) -> None:
        self.files = files
        self.vision = vision
        self.text_projection = text_projection  # (C, D): features = pooled text @ text_projection
        self.preprocess = preprocess

    @property
    def name(self) -> str:
        return self.files.name

    @property
    def dim(self) -> int:
        return int(self.text_projection.shape[1])

    @property
    def device(self) -> torch.device:
        return next(self.vision.parameters()).device

    @torch.no_grad()
    def features(self, images: list[Image.Image]) -> torch.Tensor:
        """(n, D) float32 on the CPU: the projected image features, not normalised (CLIP's get_image_features)."""
        pixels = torch.stack([preprocess_image(image, self.preprocess) for image in images])
        out = self.vision(pixel_values=pixels.to(self.device, next(self.vision.parameters()).dtype))
        return out.image_embeds.float().cpu()


def find_clip(path: str | Path) -> ClipFiles:
    """Where the CLIP model `path` is and its layout ("built-in" for a tiny CLIP's name), or a sentence saying what
    to put there; reads no weights."""
    name = str(path).strip()
    if is_tiny_clip(name):
        return ClipFiles(Path(name), "built-in", [])
    if name.lower().startswith("tiny-") and not Path(name).expanduser().exists():
        tiny_clip_spec(name)  # raises: a mistyped built-in name gets the list of built-in ones
    return find_clip_files(path)


def load_clip(path: str | Path, device: str | torch.device = "cpu") -> ClipImageTower:
    """The image tower and projections of the CLIP model at `path`; a sentence saying what to put where if none."""
    files = find_clip(path)
    if files.layout == "built-in":
        vision, projection, preprocess = tiny_clip_parts(files.name, device)
        return ClipImageTower(files, vision, projection, preprocess)
    sd = read_clip_tensors(files, {"vision", "text_projection"})
    if not any(k.startswith("vision_model.") for k in sd) or "visual_projection.weight" not in sd:
        raise ArtifactError(f"{files.source} has no CLIP image tower with its projection: name {WHAT_TO_PUT}")
    projection = _text_projection(files, sd)
    vision = _build_vision(files, sd, device)
    if int(vision.config.projection_dim) != projection.shape[1]:
        raise ArtifactError(f"{files.source}: the image features ({vision.config.projection_dim} wide) and the text "
                            f"projection ({projection.shape[1]} wide) do not match; the files are from two models")
    return ClipImageTower(files, vision, projection, preprocess_settings(files, int(vision.config.image_size)))


def load_text_projection(path: str | Path) -> torch.Tensor:
    """(C, D) float32: only the text projection of the CLIP model at `path` (enough to apply an embedding)."""
    files = find_clip(path)
    if files.layout == "built-in":
        return tiny_clip_projection(files.name)
    return _text_projection(files, read_clip_tensors(files, {"text_projection"}))


def _text_projection(files: ClipFiles, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    weight = sd.get("text_projection.weight")
    if weight is None or weight.ndim != 2:
        raise ArtifactError(f"{files.source} has no CLIP text projection (text_projection): name {WHAT_TO_PUT}")
    return weight.t().to(torch.float32).contiguous()


def _build_vision(files: ClipFiles, sd: dict[str, torch.Tensor], device: str | torch.device) -> Any:
    """transformers' CLIPVisionModelWithProjection with the file's weights, built without a random init."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(**vision_settings(files, sd))
    model: Any
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    model = model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(sd_for(model, sd), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ArtifactError(f"{files.source}: the CLIP image tower's weights do not fit its config (missing "
                            f"{missing[:3]}, unexpected {unexpected[:3]}); the files are damaged or from another "
                            f"model: name {WHAT_TO_PUT}")
    for name, buffer in model.named_buffers():
        if name.endswith("position_ids"):  # a buffer to_empty left uninitialised
            buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    model = model.to(torch.device(device), torch.float32)
    return model.eval().requires_grad_(False)


def sd_for(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image tower's entries of `sd` (the text projection is kept aside)."""
    return {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))}


def preprocess_image(image: Image.Image, pre: Preprocess) -> torch.Tensor:
    """(3, crop, crop) float32: RGB, shortest edge resized (bicubic), centre crop, scaled to [0, 1], normalised
    with the model's mean and std, as transformers' CLIPImageProcessor does it."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(pre.resize * long / short)
    size = (pre.resize, new_long) if width <= height else (new_long, pre.resize)
    resized = rgb.resize(size, Image.Resampling.BICUBIC)
    top, left = (resized.height - pre.crop) // 2, (resized.width - pre.crop) // 2
    cropped = resized.crop((left, top, left + pre.crop, top + pre.crop))
    scaled = np.asarray(cropped, dtype=np.float32) / np.float32(255.0)
    normalised = (scaled - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32))
