"""Live device bytes of a training step, counted op by op: a dispatch mode that sees every tensor an operator
makes, follows each storage until it is freed, and files it under a category (weights, gradients, optimizer state,
activations, temporaries, EMA, caches).

It counts what torch really allocates, so it works alike on real tensors and on fake ones
(`torch._subclasses.fake_tensor.FakeTensorMode`: shapes and dtypes, no data), which is how `train.memory`
measures a full-size model's step on a machine without its GPU. Storages are rounded up to the CUDA caching
allocator's 512-byte blocks.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CATEGORIES = ("weights", "gradients", "optimizer", "activations", "temporaries", "ema", "caches")
BLOCK = 512  # the CUDA caching allocator's smallest block: every allocation is rounded up to it
_SCALAR = torch.ops.aten._local_scalar_dense.default
_DEVICE = torch.ops.prim.device.default


def rounded(nbytes: int) -> int:
    """`nbytes` in the CUDA allocator's blocks."""
    return (nbytes + BLOCK - 1) // BLOCK * BLOCK


class LiveBytes(TorchDispatchMode):
    """Counts live bytes by category and keeps the peak with its breakdown.

    New storages are filed by phase: "activations" outside backward (and for checkpointing's recompute inside it),
    "temporaries" in backward and in the optimizer step; `file_as` refiles known tensors (weights, gradients,
    optimizer state, averages); `host` takes storages off the count (tensors that live in host memory on a GPU
    machine: the frozen originals a session set aside, the text cache). `scalar` answers `.item()` on fake
    tensors (they hold no value; a training step reads only loss and finiteness flags, never shapes, from them).
    """

    def __init__(self, scalar: float | None = None) -> None:
        super().__init__()
        self.scalar = scalar
        self.phase = "activations"
        self.live: dict[int, tuple[int, str]] = {}  # id(storage) -> (bytes, category)
        self._refs: dict[int, weakref.ref[Any]] = {}
        self.totals = dict.fromkeys(CATEGORIES, 0)
        self.current = 0
        self.peak = 0
        self.peak_by_category = dict(self.totals)
        # the steps' segments (`begin_segment`): name, then [largest live bytes less the optimizer state, totals then]
        self.segments: list[tuple[str, list[Any]]] = []
        self._segment: list[Any] | None = None
        self.step = 0  # the measured step, for the segments' names

    # --- bookkeeping ----------------------------------------------------------------------------------------------
    def _storage(self, tensor: torch.Tensor) -> Any | None:
        try:
            return tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or otherwise storage-less tensors
            return None

    def track(self, tensor: torch.Tensor, category: str, refile: bool = True) -> None:
        """Count `tensor`'s storage under `category`; one already counted is refiled when `refile` (an operator's
        output that shares a storage, a view or an alias, keeps the category of the storage it views)."""
        storage = self._storage(tensor)
        if storage is None or tensor.device.type == "meta" and not _is_fake(tensor):
            return
        key = id(storage)
        if key in self.live:
            if refile:
                self._refile(key, category)
            return
        nbytes = rounded(storage.nbytes())
        if nbytes == 0:
            return
        self.live[key] = (nbytes, category)
        self._refs[key] = weakref.ref(storage, functools.partial(self._freed, key))
        self.totals[category] += nbytes
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            self.peak_by_category = dict(self.totals)
        segment = self._segment
        if segment is not None and self.current - self.totals["optimizer"] > segment[0]:
            segment[0] = self.current - self.totals["optimizer"]
            segment[1] = dict(self.totals)

    def _refile(self, key: int, category: str) -> None:
        nbytes, old = self.live[key]
        if old == category:
            return
        self.totals[old] -= nbytes
        self.totals[category] += nbytes
        self.live[key] = (nbytes, category)

    def _freed(self, key: int, _ref: Any) -> None:
        self._free(key)

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        self._refs.pop(key, None)
        if entry is None:
            return
        nbytes, category = entry
        self.totals[category] -= nbytes
        self.current -= nbytes

    def file_as(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Count these tensors under `category`, whatever they were counted as."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self.track(tensor, category)

    def bytes_of(self, tensors: Iterable[torch.Tensor]) -> dict[str, int]:
        """The live bytes of these tensors' storages (each once), by category."""
        seen: set[int] = set()
        out: dict[str, int] = {}
        for tensor in tensors:
            storage = self._storage(tensor) if isinstance(tensor, torch.Tensor) else None
            if storage is None or id(storage) in seen or id(storage) not in self.live:
                continue
            seen.add(id(storage))
            nbytes, category = self.live[id(storage)]
            if nbytes:
                out[category] = out.get(category, 0) + nbytes
        return out

    def host(self, tensors: Iterable[torch.Tensor]) -> None:
        """Take these tensors off the count: on a GPU machine they live in host memory."""
        for tensor in tensors:
            storage = self._storage(tensor) if isinstance(tensor, torch.Tensor) else None
            if storage is not None:
                self.host_keys([id(storage)])

    def host_keys(self, keys: Iterable[int]) -> None:
        """`host` by storage id (`live`'s keys)."""
        for key in keys:
            entry = self.live.get(key)
            if entry is None or entry[0] == 0:
                continue
            nbytes, category = entry
            self.totals[category] -= nbytes
            self.current -= nbytes
            self.live[key] = (0, "caches")  # known (its weak reference still clears it), zero bytes on the device

    def begin_segment(self, name: str, moving: bool = True) -> None:
        """From here on, keep apart the largest live total less the optimizer state, with the totals at that moment
        (starting from now's; `moving=False`: only now's): what the same steps with another optimizer state would
        peak at is computed from it (`train.memory.with_8bit_adamw`)."""
        segment = [self.current - self.totals["optimizer"], dict(self.totals)]
        self.segments.append((name, segment))
        self._segment = segment if moving else None

    def end_segments(self) -> None:
        self._segment = None

    def reset_peak(self) -> None:
        self.peak = self.current
        self.peak_by_category = dict(self.totals)

    # --- the dispatch hook ----------------------------------------------------------------------------------------
    def _category(self) -> str:
        if torch._C._current_graph_task_id() != -1:  # inside backward
            return "activations" if torch.is_grad_enabled() else "temporaries"  # grad on: checkpoint recompute
        return self.phase

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is _DEVICE:  # a fake tensor's device, asked by autograd for every tensor it sees: makes nothing
            device = getattr(args[0], "fake_device", None)  # what FakeTensorMode answers, without its dispatch
            return device if device is not None else func(*args)
        if func is _SCALAR and self.scalar is not None:
            dtype = args[0].dtype
            return bool(self.scalar) if dtype == torch.bool else (int(self.scalar) if not dtype.is_floating_point
                                                                  else float(self.scalar))
        out = func(*args, **(kwargs or {}))
        category = self._category()
        if isinstance(out, torch.Tensor):
            self.track(out, category, refile=False)
            return out
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf, category, refile=False)
        return out


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(tensor, FakeTensor)


def module_tensors(modules: Iterable[torch.nn.Module]) -> list[torch.Tensor]:
    """Every parameter and buffer under `modules`."""
    out: list[torch.Tensor] = []
    for module in modules:
        out.extend(module.parameters())
        out.extend(module.buffers())
    return out
