"""The optional `<file>.pt.optim` sidecar that lets a resumed WebUI run keep its optimizer state."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune_core.errors import ArtifactError
from finetune_core.formats.atomic import load_pt, save_pt

OPTIM_SUFFIX = ".optim"


@dataclass
class OptimizerSidecar:
    """Optimizer state paired with the artefact it belongs to by `hash`."""

    hash: str
    optimizer_state_dict: dict[str, Any]
    optimizer_name: str | None = None


def sidecar_path(artifact_path: str | os.PathLike[str]) -> Path:
    """`<file>.pt` -> `<file>.pt.optim`, where the WebUI looks for it."""
    artifact = Path(artifact_path)
    return artifact.with_name(artifact.name + OPTIM_SUFFIX)


def file_shorthash(path: str | os.PathLike[str]) -> str:
    """First 10 hex digits of the file's sha256: the hash a hypernetwork sidecar is paired by."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:10]


def write_optimizer_sidecar(artifact_path: str | os.PathLike[str], sidecar: OptimizerSidecar,
                            overwrite: bool = True) -> Path:
    """Write `<file>.optim`; it belongs to the artefact, so by default it replaces an older one."""
    obj: dict[str, Any] = {"hash": str(sidecar.hash), "optimizer_state_dict": sidecar.optimizer_state_dict}
    if sidecar.optimizer_name is not None:
        obj["optimizer_name"] = str(sidecar.optimizer_name)
    return save_pt(obj, sidecar_path(artifact_path), overwrite)


def read_optimizer_sidecar(artifact_path: str | os.PathLike[str], expected_hash: str | None = None
                           ) -> OptimizerSidecar | None:
    """The sidecar of `artifact_path`, or None when there is none or its hash does not match (the WebUI's rule)."""
    path = sidecar_path(artifact_path)
    if not path.is_file():
        return None
    obj = load_pt(path)
    if not isinstance(obj, Mapping) or "optimizer_state_dict" not in obj or "hash" not in obj:
        raise ArtifactError(f"{path} is not an optimizer sidecar (expected 'hash' and 'optimizer_state_dict'); "
                            f"delete it to start with a fresh optimizer")
    if expected_hash is not None and str(obj["hash"]) != expected_hash:
        return None
    name = obj.get("optimizer_name")
    return OptimizerSidecar(hash=str(obj["hash"]), optimizer_state_dict=dict(obj["optimizer_state_dict"]),
                            optimizer_name=None if name is None else str(name))


TORCH_OPTIMIZER_NAMES = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}  # the WebUI's optimizer_dict keys


def webui_optimizer_name(name: str) -> str | None:
    """Our optimizer setting as the torch class name the WebUI looks up, or None for non-torch optimizers."""
    return TORCH_OPTIMIZER_NAMES.get(name)


def embedding_checksum(vectors: torch.Tensor) -> str:
    """The WebUI's `Embedding.checksum()` (textual_inversion.py): 4 hex digits pairing an embedding with its .optim."""
    value = 0
    for number in (vectors.detach().to("cpu", torch.float32).reshape(-1) * 100).tolist():
        value = (value * 281 ^ int(number) * 997) & 0xFFFFFFFF
    return f"{value & 0xFFFF:04x}"
