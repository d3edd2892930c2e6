"""Attention-mask files: `<image>_att.<ext>` next to a training image weights its loss per area.

DreamArtist's convention (methods.md §4.3): a grayscale picture of the image's size; a grey value v (0-255) weighs
v / 127 up to mid-grey and 1 + 4 * (v - 127) / 128 above it, so black 0, 25% 0.5, mid-grey 1, 75% 3, white 5.
A mask goes through the same resize, crop and flip as its image, then is resized to the latent grid.
Mask files are never training images themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from finetune_core.data.transforms import load_image
from finetune_core.errors import DatasetError

MASK_SUFFIX = "_att"


def mask_of(image: Path, files: set[Path]) -> Path | None:
    """The attention mask of `image` among `files`: same folder, stem + `_att`, the image's extension first."""
    candidates = [image.with_name(f"{image.stem}{MASK_SUFFIX}{image.suffix}")]
    candidates += sorted(p for p in files if p.parent == image.parent and p.stem == image.stem + MASK_SUFFIX
                         and p not in candidates)
    return next((p for p in candidates if p in files), None)


def split_masks(images: Iterable[Path]) -> tuple[list[Path], dict[Path, Path]]:
    """(training images, {image: its mask}): a file `X_att.*` whose image `X.*` is there is a mask, not an image."""
    files = set(images)
    masks = {image: mask for image in sorted(files) if (mask := mask_of(image, files)) is not None}
    used = set(masks.values())
    return sorted(p for p in files if p not in used), masks


def load_mask(path: Path, image_size: tuple[int, int]) -> torch.Tensor:
    """The mask as (1, H, W) grey in [0, 1]; a DatasetError when it is not a grayscale picture of `image_size`."""
    loaded = load_image(path)
    if loaded.size != image_size:
        raise DatasetError(f"the attention mask {path} is {loaded.size[0]}x{loaded.size[1]} but its image is "
                           f"{image_size[0]}x{image_size[1]}; save the mask at the image's size")
    if loaded.alpha is not None and float(loaded.alpha.min()) < 1.0:
        raise DatasetError(f"the attention mask {path} has transparent areas; save it as a grayscale image "
                           f"without alpha (black = ignore, mid-grey = normal, white = 5x)")
    rgb = loaded.rgb
    if float((rgb - rgb.mean(dim=0, keepdim=True)).abs().max()) > 1.5 / 255:
        raise DatasetError(f"the attention mask {path} is in colour; save it as a grayscale image "
                           f"(black = ignore, mid-grey = normal, white = 5x)")
    return rgb[:1]


def check_mask(path: Path, image: Path) -> None:
    """Refuse a mask that `load_mask` would refuse, before a job starts (reads both files)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(image) as opened:
            upright = ImageOps.exif_transpose(opened)
            size = (upright or opened).size
    except (OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"{image} could not be read as an image ({exc}); fix or remove the file") from exc
    load_mask(path, size)


def mask_weight(grey: torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
    """(1, h, w) loss weight from a cropped (1, H, W) mask in [0, 1]: resized to the latent grid, then mapped."""
    small = F.interpolate(grey[None].float(), size=(latent_h, latent_w), mode="bicubic", align_corners=False,
                          antialias=True)[0].clamp(0.0, 1.0) * 255.0
    return torch.where(small <= 127, small / 127.0, 1.0 + 4.0 * (small - 127.0) / 128.0)
