"""Latent and text-conditioning caches, keyed so that an edited image or another model never hits a stale entry."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from finetune_core.data.transforms import CropPlan
from finetune_core.formats.atomic import atomic_write
from finetune_core.model.interface import LatentMoments, TextConditioning

logger = logging.getLogger(__name__)

_KEY_VERSION = "1"  # bump when what a cached latent means changes (resize filter, value range, ...)


def encoder_identity(model: Any) -> str:
    """Who encoded a cached latent or prompt: the model's name and short hash (its own VAE and text encoders)."""
    return f"{model.identity.name}:{model.identity.shorthash}"


def latent_key(content_hash: str, plan: CropPlan, flip: bool, vae_id: str) -> str:
    """Cache key of one encoded sample: image bytes, resize, crop box, flip and the VAE that encoded it."""
    text = "|".join([_KEY_VERSION, content_hash, f"{plan.resized_w}x{plan.resized_h}",
                     f"{plan.left},{plan.top},{plan.width},{plan.height}", "flip" if flip else "noflip", vae_id])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class LatentCache:
    """VAE posteriors by key: in memory, and optionally as `<key>.safetensors` files in a folder that outlives runs."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self._memory: dict[str, LatentMoments] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> LatentMoments | None:
        """The cached moments for `key`, or None."""
        found = self._memory.get(key) or self._read(key)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self._memory[key] = found
        return found

    def put(self, key: str, moments: LatentMoments) -> LatentMoments:
        """Store moments (CPU float32) in memory and, when a folder is set, on disk; return the stored copy."""
        stored = LatentMoments(moments.mean.detach().float().cpu().contiguous(),
                               moments.std.detach().float().cpu().contiguous())
        self._memory[key] = stored
        if self.directory is not None:
            tensors = {"mean": stored.mean, "std": stored.std}
            atomic_write(self._path(key), lambda tmp: save_file(tensors, str(tmp)), overwrite=True)
        return stored

    def __len__(self) -> int:
        return len(self._memory)

    def _path(self, key: str) -> Path:
        return Path(self.directory or ".") / f"{key}.safetensors"

    def _read(self, key: str) -> LatentMoments | None:
        if self.directory is None or not self._path(key).is_file():
            return None
        try:
            tensors = load_file(str(self._path(key)))
            return LatentMoments(tensors["mean"], tensors["std"])
        except (SafetensorError, OSError, KeyError) as exc:
            # A damaged cache file is only a lost shortcut: encode again and overwrite it.
            logger.warning("ignoring unreadable latent cache file %s: %s", self._path(key), exc)
            return None


class TextCache:
    """Text conditioning per (text-encoder identity, prompt), for runs whose text encoders are frozen."""

    def __init__(self) -> None:
        self._memory: dict[tuple[str, str], TextConditioning] = {}
        self.hits = 0
        self.misses = 0

    def encode(self, model: Any, prompts: list[str]) -> TextConditioning:
        """Conditioning of `prompts`, encoding only the prompts not seen before with this text encoder."""
        encoder = encoder_identity(model)
        missing = list(dict.fromkeys(p for p in prompts if (encoder, p) not in self._memory))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        for prompt in missing:
            # One prompt per call, so each entry has its own chunk count and does not depend on its batch mates.
            with torch.no_grad():
                self._memory[(encoder, prompt)] = model.encode_prompts([prompt]).to("cpu")
        parts = [self._memory[(encoder, p)] for p in prompts]
        if len({part.context.shape[1] for part in parts}) > 1:
            # Prompts of different chunk counts: let the model pad them together as it does for any batch.
            with torch.no_grad():
                return model.encode_prompts(prompts).to("cpu")
        return TextConditioning.cat(parts)

    def __len__(self) -> int:
        return len(self._memory)

    def tensors(self) -> list[torch.Tensor]:
        """The cached conditioning tensors (kept in RAM)."""
        return [t for cond in self._memory.values() for t in (cond.context, cond.pooled) if t is not None]
