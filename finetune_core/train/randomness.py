"""Counter-based randomness: every random draw of a run is a function of (seed, stream, index).

Nothing depends on how many draws came before, so a run resumed at any step draws exactly what the
uninterrupted run drew, and previews (their own stream) cannot shift the training noise.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator

import torch

NOISE = "noise"
TIMESTEPS = "timesteps"
FORWARD = "forward"  # dropout and any other global-RNG use inside a method's loss
PREVIEW = "preview"


def stream_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit seed for draw `index` of `stream` in a run seeded `seed` (hashed, so nearby counters decorrelate)."""
    digest = hashlib.blake2b(f"{seed}:{stream}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generators(seed: int, stream: str, indices: range | list[int]) -> list[torch.Generator]:
    """One CPU generator per index (e.g. per sample of a micro-batch)."""
    return [torch.Generator().manual_seed(stream_seed(seed, stream, i)) for i in indices]


def resolve_seed(seed: int) -> int:
    """The WebUI convention: -1 means a fresh random seed, drawn once per run and then recorded."""
    if seed == -1:
        return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    return seed


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNG for a block and restore the caller's RNG state afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
