"""Embeddings carried by preview images: the `sd-ti-embedding` PNG text chunk and the WebUI's pixel encoding.

The pixel form (webui-integration §6a): zlib level 9 of the JSON, split into low and high nibbles, each laid out
row-major as an (h × w × 3) block, decorated in the high nibble with a pattern from the first 1024 vector values,
XORed in the low nibble with an LCG stream, and pasted left (low) and right (high) of the picture, each separated
from it by a 1-px black column. Only low nibbles carry data, so the decoration never disturbs decoding.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from finetune_core.errors import ArtifactError
from finetune_core.formats.atomic import atomic_write

TEXT_CHUNK_KEY = "sd-ti-embedding"
TENSOR_TAG = "TORCHTENSOR"
IMAGE_SUFFIXES = (".png", ".webp", ".jxl", ".avif")
WRITABLE_SUFFIXES = (".png", ".webp")
_CHANNELS = 3
_PATTERN_CELL = 8


def data_to_json(data: dict[str, Any]) -> str:
    """JSON of a WebUI embedding dict, each tensor written as {"TORCHTENSOR": nested lists}."""
    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {TENSOR_TAG: value.detach().cpu().tolist()}
        raise TypeError(f"cannot store a {type(value).__name__} in an image embedding")
    return json.dumps(data, default=encode)


def data_from_json(text: str | bytes) -> dict[str, Any]:
    """Inverse of `data_to_json`; tensors come back as float32."""
    def decode(obj: dict[str, Any]) -> Any:
        if set(obj) == {TENSOR_TAG}:
            return torch.tensor(obj[TENSOR_TAG], dtype=torch.float32)
        return obj
    data = json.loads(text, object_hook=decode)
    if not isinstance(data, dict):
        raise ValueError("the embedded JSON is not an object")  # noqa: TRY004 (callers catch ValueError)
    return data


def lcg_nibbles(count: int) -> np.ndarray:
    """The XOR stream of the pixel form: LCG m=2**32, a=1664525, c=1013904223 from seed 0, mod 255, low 4 bits."""
    out = np.empty(count, dtype=np.uint8)
    state = 0
    for i in range(count):
        state = (1664525 * state + 1013904223) % 4294967296
        out[i] = (state % 255) & 0x0F
    return out


def embed_in_pixels(image: Image.Image, data: dict[str, Any]) -> Image.Image:
    """A new picture: the low-nibble block, a black column, `image`, a black column, the high-nibble block."""
    picture = image.convert("RGB")
    packed = np.frombuffer(zlib.compress(data_to_json(data).encode("utf-8"), 9), dtype=np.uint8)
    pattern = _pattern_values(data)
    low = _data_block(packed & 0x0F, picture.height, pattern)
    high = _data_block(packed >> 4, picture.height, pattern[::-1])
    width = low.shape[1] + 1 + picture.width + 1 + high.shape[1]
    canvas = Image.new("RGB", (width, picture.height), (0, 0, 0))
    canvas.paste(Image.fromarray(low, "RGB"), (0, 0))
    canvas.paste(picture, (low.shape[1] + 1, 0))
    canvas.paste(Image.fromarray(high, "RGB"), (low.shape[1] + 1 + picture.width + 1, 0))
    return canvas


def extract_from_pixels(image: Image.Image) -> dict[str, Any] | None:
    """Decode the pixel form; None when the picture carries no readable data."""
    pixels = _crop_black(np.asarray(image.convert("RGB"), dtype=np.uint8)) & 0x0F
    black = np.flatnonzero(pixels.sum(axis=(0, 2)) == 0)
    if black.size < 2:
        return None
    low, high = pixels[:, :black[0]], pixels[:, black[-1] + 1:]
    if low.size == 0 or low.shape != high.shape:
        return None
    stream = lcg_nibbles(low.size).reshape(low.shape)
    packed = (((high ^ stream) << 4) | (low ^ stream)).astype(np.uint8).tobytes()
    try:
        # The blocks are padded by repeating the data, so bytes after the zlib stream are expected and ignored.
        return data_from_json(zlib.decompressobj().decompress(packed).decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, ValueError):
        return None


def read_image_data(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The embedding dict inside an image, from its text chunk or else its pixels (the WebUI's order)."""
    source = Path(path)
    try:
        with Image.open(source) as image:
            image.load()
            text = getattr(image, "text", {}).get(TEXT_CHUNK_KEY)
            if text is not None:
                return data_from_json(base64.b64decode(text))
            data = extract_from_pixels(image)
    except FileNotFoundError as exc:
        raise ArtifactError(f"{source} does not exist") from exc
    except (OSError, binascii.Error, ValueError) as exc:
        raise ArtifactError(f"{source} is not a readable image embedding: {exc}") from exc
    if data is None:
        raise ArtifactError(f"{source} is an image without an embedding inside (no '{TEXT_CHUNK_KEY}' text "
                            f"chunk and no data blocks at its sides)")
    return data


def write_image_data(data: dict[str, Any], picture: Image.Image, path: str | os.PathLike[str],
                     overwrite: bool = False) -> Path:
    """Save `picture` with the WebUI embedding dict `data` inside, as the WebUI trainer does for `image_embeddings/`.

    A .png carries both the text chunk and the pixel data; a .webp (lossless) only the pixel data.
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in WRITABLE_SUFFIXES:
        raise ArtifactError(f"{target}: image embeddings are written as .png or .webp, not '{target.suffix}'")
    combined = embed_in_pixels(picture, data)
    if suffix == ".webp":
        return atomic_write(target, lambda tmp: combined.save(tmp, format="WEBP", lossless=True, quality=100),
                            overwrite)
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_CHUNK_KEY, base64.b64encode(data_to_json(data).encode("utf-8")).decode("ascii"))
    return atomic_write(target, lambda tmp: combined.save(tmp, format="PNG", pnginfo=info), overwrite)


def _data_block(nibbles: np.ndarray, height: int, pattern: np.ndarray) -> np.ndarray:
    """Nibbles as an (height × w × 3) block: repeated to fill it, XORed with the stream, pattern in the high bits."""
    per_column = height * _CHANNELS
    total = max(1, -(-nibbles.size // per_column)) * per_column
    block = np.resize(nibbles, total).reshape(height, -1, _CHANNELS)
    block = block ^ lcg_nibbles(block.size).reshape(block.shape)
    return (block | _pattern_block(block.shape, pattern)).astype(np.uint8)


def _pattern_block(shape: tuple[int, ...], pattern: np.ndarray) -> np.ndarray:
    """High-nibble decoration: square cells shaded by successive pattern values."""
    rows, cols = np.indices(shape[:2])
    cells = (rows // _PATTERN_CELL) * (-(-shape[1] // _PATTERN_CELL)) + cols // _PATTERN_CELL
    shades = pattern[cells % pattern.size] & 0xF0
    return np.repeat(shades[:, :, None], shape[2], axis=2).astype(np.uint8)


def _pattern_values(data: dict[str, Any]) -> np.ndarray:
    """The first 1024 values of the first vector, scaled to 0..255 by their largest magnitude."""
    vec = next(iter(data["string_to_param"].values()))
    values = vec.detach().float().reshape(-1)[:1024].abs().cpu().numpy()
    peak = float(values.max()) if values.size else 0.0
    if not np.isfinite(peak) or peak <= 0:
        return np.full(1, 128, dtype=np.uint8)
    return np.nan_to_num(values / peak * 255).astype(np.uint8)


def _crop_black(pixels: np.ndarray) -> np.ndarray:
    """Drop outer rows and columns where no pixel has all channels non-zero."""
    lit = np.all(pixels > 0, axis=2)
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if rows.size == 0 or cols.size == 0:
        return pixels[:0, :0]
    return pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
