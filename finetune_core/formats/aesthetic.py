"""Aesthetic-gradient embeddings: one CLIP image-feature vector saved as a (1, D) float32 tensor (methods §5.1),
and our safetensors copy beside it that also holds the CLIP's text projection and who made it from what."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from finetune_core.errors import ArtifactError
from finetune_core.formats.atomic import atomic_write, load_pt, save_pt


def write_aesthetic_embedding(vector: torch.Tensor, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Save `vector` ([D] or [1, D]) as the (1, D) float32 tensor the aesthetic-gradients extension loads."""
    if not sniff(vector):
        raise ArtifactError(f"{path}: an aesthetic embedding is one vector of shape [D] or [1, D], "
                            f"got {_shape_text(vector)}")
    plain = vector.detach().to("cpu", torch.float32).reshape(1, -1).contiguous().clone()
    if not torch.isfinite(plain).all():
        raise ArtifactError(f"{path}: the aesthetic embedding has NaN or infinite values; it was not saved")
    return save_pt(plain, path, overwrite)


def read_aesthetic_embedding(path: str | os.PathLike[str]) -> torch.Tensor:
    """Load an aesthetic embedding as a (1, D) float32 tensor; also accepts the shipped 1-D and fp16 files."""
    obj = load_pt(path)
    if not sniff(obj):
        raise ArtifactError(f"{path} is not an aesthetic embedding (one tensor of shape [1, D]): "
                            f"it holds {_shape_text(obj)}")
    return obj.detach().to("cpu", torch.float32).reshape(1, -1)


def sniff(obj: Any) -> bool:
    """Whether a loaded object is one floating-point vector of shape [D] or [1, D]."""
    return (isinstance(obj, torch.Tensor) and obj.is_floating_point() and obj.numel() > 0
            and (obj.ndim == 1 or (obj.ndim == 2 and obj.shape[0] == 1)))


def _shape_text(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


# The safetensors copy written beside each `.pt`: the same vector, the text projection of the CLIP that made it
# (text width C -> joint width D; features = pooled text @ projection), and who made it from what.
VECTOR_KEY = "aesthetic_embedding"
PROJECTION_KEY = "text_projection"
SUFFIXES = (".pt", ".safetensors")


@dataclass(frozen=True)
class AestheticFiles:
    """One named aesthetic embedding: its `.pt` (the original extension's file) and/or our safetensors copy."""

    name: str
    pt: Path | None
    sidecar: Path | None

    @property
    def path(self) -> Path:
        return self.pt or self.sidecar  # type: ignore[return-value]


def write_aesthetic_files(vector: torch.Tensor, projection: torch.Tensor, metadata: Mapping[str, str],
                          folder: Path, name: str, overwrite: bool = False) -> list[Path]:
    """`<name>.pt` (the (1, D) float32 tensor the original extension reads) and `<name>.safetensors` (the same
    vector, the text projection (C, D) and `metadata`)."""
    if projection.ndim != 2 or projection.shape[1] != vector.numel():
        raise ArtifactError(f"the text projection {tuple(projection.shape)} does not end in the embedding's width "
                            f"{vector.numel()}; both must come from the same CLIP model")
    pt = write_aesthetic_embedding(vector, folder / f"{name}.pt", overwrite)
    tensors = {VECTOR_KEY: vector.detach().to("cpu", torch.float32).reshape(1, -1).contiguous(),
               PROJECTION_KEY: projection.detach().to("cpu", torch.float32).contiguous()}
    meta = {"format": "aesthetic-embedding", **{str(k): str(v) for k, v in metadata.items()}}
    sidecar = atomic_write(folder / f"{name}.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=meta),
                           overwrite)
    return [pt, sidecar]


def read_aesthetic_sidecar(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """(vector (1, D), text projection (C, D), metadata) of an aesthetic embedding's safetensors copy."""
    source = Path(path)
    try:
        with safe_open(str(source), framework="pt") as handle:
            keys, metadata = set(handle.keys()), dict(handle.metadata() or {})
            if not {VECTOR_KEY, PROJECTION_KEY} <= keys:
                raise ArtifactError(f"{source} is not an aesthetic embedding's safetensors copy (it has "
                                    f"{', '.join(sorted(keys)[:4]) or 'no tensors'}, not {VECTOR_KEY} and "
                                    f"{PROJECTION_KEY})")
            vector, projection = handle.get_tensor(VECTOR_KEY), handle.get_tensor(PROJECTION_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{source} is not a readable .safetensors file (truncated or another format): "
                            f"{exc}") from exc
    if not sniff(vector) or projection.ndim != 2 or projection.shape[1] != vector.numel():
        raise ArtifactError(f"{source}: the embedding {tuple(vector.shape)} and the text projection "
                            f"{tuple(projection.shape)} do not fit together; create the embedding again")
    return vector.float().reshape(1, -1), projection.float(), metadata


def is_sidecar(path: Path) -> bool:
    """Whether a .safetensors file is an aesthetic embedding's copy (read from its header only)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return VECTOR_KEY in handle.keys()
    except (SafetensorError, OSError, ValueError):
        return False


def find_aesthetic_embeddings(folders: Iterable[Path]) -> dict[str, AestheticFiles]:
    """Every aesthetic embedding in `folders` (top level, as the original extension lists it), by name; a name in
    an earlier folder hides the same name in a later one."""
    found: dict[str, AestheticFiles] = {}
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        stems: dict[str, dict[str, Path]] = {}
        for path in sorted(Path(folder).iterdir()):
            if path.is_file() and path.suffix.lower() in SUFFIXES and not path.name.startswith("."):
                stems.setdefault(path.stem, {})[path.suffix.lower()] = path
        for name, paths in stems.items():
            sidecar = paths.get(".safetensors")
            sidecar = sidecar if sidecar is not None and is_sidecar(sidecar) else None
            if name not in found and (".pt" in paths or sidecar is not None):
                found[name] = AestheticFiles(name, paths.get(".pt"), sidecar)
    return found
