"""Textual-inversion embedding files in every layout the WebUI loads (`.pt`/`.bin`, `.safetensors`, images)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors import safe_open
from safetensors.torch import save_file

from finetune_core.errors import ArtifactError
from finetune_core.formats.atomic import atomic_write, load_pt, save_pt
from finetune_core.formats.describe import describe_object
from finetune_core.formats.image_embedding import IMAGE_SUFFIXES, WRITABLE_SUFFIXES, read_image_data, write_image_data

logger = logging.getLogger(__name__)

# The WebUI writes this constant (the CLIP id of "*", kept from the original rinongal format) and never reads it.
STAR_TOKEN_ID = 265
# Key of the single tensor in SD1/SD2 `.safetensors` embeddings: kohya's name; the WebUI ignores the key.
SINGLE_TENSOR_KEY = "emb_params"
TORCH_SUFFIXES = (".pt", ".bin")


@dataclass
class EmbeddingFile:
    """One trained embedding: its vectors per text encoder and the metadata the WebUI stamps into it.

    SD1/SD2 embeddings use the single key "clip_l" whatever their width; SDXL ones have "clip_l" and "clip_g".
    """

    name: str
    vectors: dict[str, torch.Tensor]
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        """Whether this embedding has both SDXL encoders' vectors."""
        return "clip_g" in self.vectors

    @property
    def num_vectors(self) -> int:
        """Vectors per token (rows)."""
        return int(self.vectors["clip_l"].shape[0])

    @property
    def width(self) -> int:
        """Total width the WebUI compares with the model's (768 SD1, 1024 SD2, 2048 SDXL)."""
        return sum(int(t.shape[-1]) for t in self.vectors.values())

    def validate(self) -> None:
        """Raise ArtifactError unless the vectors form a layout the WebUI can load."""
        keys = set(self.vectors)
        if "clip_l" not in keys or not keys <= {"clip_l", "clip_g"}:
            raise ArtifactError(f"embedding '{self.name}' must have vectors 'clip_l' (and 'clip_g' for SDXL), "
                                f"got {sorted(keys)}")
        rows = set()
        for key, tensor in self.vectors.items():
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2 or tensor.numel() == 0:
                raise ArtifactError(f"embedding '{self.name}': vectors '{key}' must be a non-empty 2-D tensor "
                                    f"[vectors, width], got {_shape_text(tensor)}")
            rows.add(int(tensor.shape[0]))
        if len(rows) != 1:
            raise ArtifactError(f"embedding '{self.name}': 'clip_l' and 'clip_g' have different vector counts {rows}")

    def to_webui_dict(self) -> dict[str, Any]:
        """The WebUI's `string_to_param` dict (SD1/SD2 only; SDXL has no such form)."""
        if self.is_sdxl:
            raise ArtifactError(f"embedding '{self.name}' is an SDXL embedding; the WebUI's single-tensor "
                                f"'string_to_param' form (used by .pt and image embeddings) would mix its two "
                                f"encoders: save it as {{'clip_l', 'clip_g'}} (.safetensors or .pt) instead")
        return {"string_to_token": {"*": STAR_TOKEN_ID}, "string_to_param": {"*": _plain(self.vectors["clip_l"])},
                "name": self.name, "step": self.step, "sd_checkpoint": self.sd_checkpoint,
                "sd_checkpoint_name": self.sd_checkpoint_name}


def write_embedding(embedding: EmbeddingFile, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write `embedding` in the layout the WebUI loads for the file's suffix (.pt/.bin or .safetensors)."""
    target = Path(path)
    embedding.validate()
    suffix = target.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        obj: Any = ({key: _plain(t) for key, t in embedding.vectors.items()} if embedding.is_sdxl
                    else embedding.to_webui_dict())
        if embedding.is_sdxl:
            logger.debug("SDXL .pt %s holds only tensors; name and step are not stored", target)
        return save_pt(obj, target, overwrite)
    if suffix == ".safetensors":
        tensors = ({key: _plain(t) for key, t in embedding.vectors.items()} if embedding.is_sdxl
                   else {SINGLE_TENSOR_KEY: _plain(embedding.vectors["clip_l"])})
        metadata = _metadata_of(embedding)
        return atomic_write(target, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), overwrite)
    if suffix in IMAGE_SUFFIXES:
        raise ArtifactError(f"{target}: image embeddings need a preview picture; use write_embedding_png")
    raise ArtifactError(f"{target}: unknown embedding file type '{target.suffix}'; use .pt, .bin or .safetensors")


def read_embedding(path: str | os.PathLike[str]) -> EmbeddingFile:
    """Read an embedding in any layout the WebUI accepts; ArtifactError says what the file is otherwise."""
    source = Path(path)
    suffix = source.suffix.lower()
    metadata: dict[str, str] = {}
    if suffix in TORCH_SUFFIXES:
        obj = load_pt(source)
    elif suffix == ".safetensors":
        obj, metadata = _load_safetensors(source)
    elif suffix in IMAGE_SUFFIXES:
        obj = read_image_data(source)
    else:
        raise ArtifactError(f"{source}: unknown embedding file type '{source.suffix}'; "
                            f"expected .pt, .bin, .safetensors, .png or .webp")
    return embedding_from_obj(obj, source, metadata)


def embedding_from_obj(obj: Any, source: Path, metadata: Mapping[str, str] | None = None) -> EmbeddingFile:
    """Turn a loaded object into an EmbeddingFile, following the WebUI's three accepted dict shapes."""
    meta = dict(metadata or {})
    if not isinstance(obj, Mapping):
        raise ArtifactError(f"{source} is not an embedding: {describe_object(obj)}")
    if "string_to_param" in obj:
        vec = _single_param(obj["string_to_param"], source)
        return EmbeddingFile(name=_text(obj.get("name")) or source.stem, vectors={"clip_l": vec},
                             step=_int_or_none(obj.get("step")), sd_checkpoint=_text(obj.get("sd_checkpoint")),
                             sd_checkpoint_name=_text(obj.get("sd_checkpoint_name")))
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == len(obj) and set(obj) == {"clip_l", "clip_g"}:
        vectors = {k: _as_rows(v) for k, v in tensors.items()}
    elif len(obj) == 1 and len(tensors) == 1:
        # Diffusers concept `{"<tok>": [d] or [n, d]}` and kohya `{"emb_params": [n, d]}` share this branch.
        vectors = {"clip_l": _as_rows(next(iter(tensors.values())))}
    else:
        raise ArtifactError(f"{source} is not an embedding: {describe_object(obj)}")
    embedding = EmbeddingFile(name=meta.pop("name", "") or source.stem, vectors=vectors,
                              step=_int_or_none(meta.pop("step", None)), sd_checkpoint=meta.pop("sd_checkpoint", None),
                              sd_checkpoint_name=meta.pop("sd_checkpoint_name", None), extra=meta)
    embedding.validate()
    return embedding


def _load_safetensors(source: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not source.is_file():
        raise ArtifactError(f"{source} does not exist")
    try:
        with safe_open(str(source), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            return {key: handle.get_tensor(key) for key in handle.keys()}, metadata  # noqa: SIM118 (not iterable)
    except Exception as exc:  # safetensors raises its own SafetensorError or OSError for damaged files
        raise ArtifactError(f"{source} is not a readable .safetensors file (truncated or another format): "
                            f"{exc}") from exc


def _single_param(params: Any, source: Path) -> torch.Tensor:
    # The WebUI accepts a plain dict or a torch.nn.ParameterDict here, with exactly one entry.
    if not hasattr(params, "values") or len(params) != 1:
        count = len(params) if hasattr(params, "__len__") else "no"
        raise ArtifactError(f"{source}: 'string_to_param' must hold exactly one tensor, it has {count} entries "
                            f"(multi-term embeddings are not supported by the WebUI)")
    value = next(iter(params.values()))
    if not isinstance(value, torch.Tensor):
        raise ArtifactError(f"{source}: 'string_to_param' holds a {type(value).__name__}, not a tensor")
    return _as_rows(value)


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Vectors as a float32 [n, d] CPU tensor; a 1-D [d] vector becomes one row, as in the WebUI."""
    tensor = tensor.detach().to("cpu", torch.float32)
    return tensor.unsqueeze(0) if tensor.ndim == 1 else tensor


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous float32 CPU copy: nothing but tensor data gets pickled."""
    return tensor.detach().to("cpu", torch.float32).contiguous().clone()


def _metadata_of(embedding: EmbeddingFile) -> dict[str, str]:
    fields = {"name": embedding.name, "step": embedding.step, "sd_checkpoint": embedding.sd_checkpoint,
              "sd_checkpoint_name": embedding.sd_checkpoint_name}
    metadata = {str(k): str(v) for k, v in embedding.extra.items()}
    metadata.update({k: str(v) for k, v in fields.items() if v is not None})
    return metadata


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _shape_text(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def write_embedding_png(embedding_file: EmbeddingFile, preview_image: Image.Image, path: str | os.PathLike[str],
                        overwrite: bool = False, caption: bool = True) -> Path:
    """Save `preview_image` with the embedding inside, as the WebUI trainer does for `image_embeddings/`.

    A .png carries both the text chunk and the pixel data; a .webp (lossless) only the pixel data.
    """
    target = Path(path)
    if target.suffix.lower() not in WRITABLE_SUFFIXES:
        raise ArtifactError(f"{target}: image embeddings are written as .png or .webp, not '{target.suffix}'")
    data = embedding_file.to_webui_dict()  # raises for SDXL, which has no image form
    picture = _caption(preview_image, embedding_file) if caption else preview_image.convert("RGB")
    return write_image_data(data, picture, target, overwrite)


def _caption(image: Image.Image, embedding_file: EmbeddingFile) -> Image.Image:
    """The preview with the name on top and model, hash, vectors and steps at the bottom (Pillow's built-in font)."""
    picture = image.convert("RGB")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    model = embedding_file.sd_checkpoint_name or ""
    short_hash = f"[{embedding_file.sd_checkpoint}]" if embedding_file.sd_checkpoint else ""
    footer = " ".join(part for part in (model, short_hash, f"{embedding_file.num_vectors}v",
                                        f"{embedding_file.step or 0}s") if part)
    for text, y in ((embedding_file.name, 2), (footer, max(2, picture.height - 14))):
        # A dark band behind the text keeps it readable on any picture (bitmap fonts have no outline).
        left, top, right, bottom = draw.textbbox((4, y), text, font=font)
        draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=(0, 0, 0))
        draw.text((4, y), text, fill=(255, 255, 255), font=font)
    return picture
