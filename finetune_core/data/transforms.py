"""Image loading (any PIL mode to RGB + optional alpha) and the pure resize / crop / flip / alpha-weight steps."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from finetune_core.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WIDE_INT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass
class LoadedImage:
    """An image as float tensors: rgb (3, H, W) in [0, 1]; alpha (1, H, W) in [0, 1] or None when opaque by mode."""

    rgb: torch.Tensor
    alpha: torch.Tensor | None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.rgb.shape[2]), int(self.rgb.shape[1])


@dataclass(frozen=True)
class CropPlan:
    """How an image becomes a training sample: resize to (resized_w, resized_h), then crop the target box."""

    resized_w: int
    resized_h: int
    left: int
    top: int
    width: int
    height: int


def load_image(path: Path) -> LoadedImage:
    """Decode an image file of any common mode (L, LA, P, RGBA, CMYK, I;16, ...) with EXIF rotation applied."""
    try:
        with Image.open(path) as opened:
            opened.load()
            # Typed Optional only for in_place=True; without it a (possibly new) image always comes back.
            image = ImageOps.exif_transpose(opened)
            return _to_tensors(image if image is not None else opened)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path} could not be read as an image ({exc}); fix or remove the file") from exc


def _to_tensors(image: Image.Image) -> LoadedImage:
    if image.mode in _WIDE_INT_MODES or image.mode == "F":
        return LoadedImage(_wide_gray(image), None)
    if image.mode == "P":
        # A palette image may carry transparency in its info; converting to RGBA keeps it.
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    alpha = None
    if image.mode in _ALPHA_MODES:
        image = image.convert("RGBA")
        alpha = _channels(np.asarray(image)[:, :, 3:4])
    rgb = image.convert("RGB") if image.mode != "RGB" else image
    return LoadedImage(_channels(np.asarray(rgb)), alpha)


def _channels(array: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 -> (C, H, W) float in [0, 1]."""
    return torch.from_numpy(np.array(array, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0


def _wide_gray(image: Image.Image) -> torch.Tensor:
    """16-bit / 32-bit / float grey to RGB in [0, 1] (PIL's own convert("RGB") would clip them at 255)."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        peak = 1.0 if values.size and values.max() <= 1.0 else 255.0
    elif image.mode == "I" and values.size and values.max() <= 255:
        peak = 255.0
    else:
        peak = 65535.0
    gray = torch.from_numpy(np.clip(values / peak, 0.0, 1.0)).float()
    return gray.unsqueeze(0).repeat(3, 1, 1)


def plan_crop(original: tuple[int, int], target: tuple[int, int], crop: str, rng: random.Random | None) -> CropPlan:
    """Scale (width, height) `original` to cover `target` keeping its aspect, then place a center or random crop."""
    (ow, oh), (tw, th) = original, target
    scale = max(tw / ow, th / oh)
    rw, rh = max(tw, round(ow * scale)), max(th, round(oh * scale))
    if crop == "random" and rng is not None:
        left, top = rng.randint(0, rw - tw), rng.randint(0, rh - th)
    else:
        left, top = (rw - tw) // 2, (rh - th) // 2
    return CropPlan(rw, rh, left, top, tw, th)


def apply_plan(image: torch.Tensor, plan: CropPlan, flip: bool) -> torch.Tensor:
    """Resize (bicubic, antialiased), crop and optionally mirror a (C, H, W) tensor in [0, 1]."""
    if (image.shape[2], image.shape[1]) != (plan.resized_w, plan.resized_h):
        image = F.interpolate(image[None], size=(plan.resized_h, plan.resized_w), mode="bicubic",
                              align_corners=False, antialias=True)[0].clamp(0.0, 1.0)
    image = image[:, plan.top:plan.top + plan.height, plan.left:plan.left + plan.width]
    return torch.flip(image, dims=[2]) if flip else image


def flipped_crop_left(plan: CropPlan) -> int:
    """Left edge of the crop measured in the mirrored image (for SDXL crop conditioning of flipped samples)."""
    return plan.resized_w - plan.left - plan.width


def to_model_range(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], the VAE's input range."""
    return image * 2.0 - 1.0


def alpha_weight(alpha: torch.Tensor | None, latent_h: int, latent_w: int) -> torch.Tensor:
    """Loss weight (1, h, w) from an alpha crop: area-resized to the latent, then w -= min, w /= mean (WebUI rule).

    An image without alpha, or with uniform alpha, weighs 1 everywhere (the WebUI would divide 0 by 0 there).
    """
    if alpha is None:
        return torch.ones(1, latent_h, latent_w)
    weight = F.interpolate(alpha[None].float(), size=(latent_h, latent_w), mode="area")[0]
    weight = weight - weight.min()
    mean = weight.mean()
    if float(mean) <= 1e-6:
        return torch.ones(1, latent_h, latent_w)
    return weight / mean


@dataclass(frozen=True)
class ImageInfo:
    """What a fully decoded image file looks like, without keeping its pixels."""

    width: int
    height: int
    mode: str
    has_alpha: bool


def probe_image(data: bytes, path: Path) -> ImageInfo:
    """Decode image bytes once to prove they are readable; return the upright size, mode and alpha presence."""
    import io

    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            width, height = opened.size
            # EXIF orientations 5-8 rotate by 90 degrees: the upright image has its sides swapped.
            if opened.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
            alpha = opened.mode in _ALPHA_MODES or (opened.mode == "P" and "transparency" in opened.info)
            return ImageInfo(width, height, opened.mode, alpha)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path} could not be read as an image ({exc}); fix or remove the file") from exc
