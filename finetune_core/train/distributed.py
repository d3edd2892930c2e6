"""Data-parallel training: which process this is, its share of every global batch, and the collectives the loop needs.

`Processes` is the single-process case (every collective is the identity): the WebUI and plain CLI runs use it and
never import accelerate. `AccelerateProcesses` is the same contract over accelerate's process group (torch DDP's
collectives underneath), for runs started by `accelerate launch -m finetune_core train ...`.

Every process draws the same global batch from the counter-based randomness and trains on its contiguous slice;
each weights its loss by its share of the batch (n_i / N) and the gradients are summed across processes, which is
the gradient of the global batch's mean loss: the same update as one process with the whole batch, up to the order
of the floating-point additions.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from finetune_core.data.data_batch import DataBatch

T = TypeVar("T")
GRADIENT_BUCKET = 1 << 24  # elements per all-reduce (64 MB of float32): one call for small adapters, bounded for a UNet


@dataclass(frozen=True)
class Shard:
    """This process's part of a global micro-batch: its samples, the global number of its first sample within the
    micro-batch, and its share of the batch (its loss weight)."""

    data: DataBatch
    start: int
    weight: float


def shard_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of process `rank`'s contiguous slice of `size` samples; the first `size % world` get one more."""
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def slice_batch(batch: DataBatch, start: int, end: int) -> DataBatch:
    """Samples [start, end) of a batch: every tensor or list with one entry per sample is cut the same way."""
    size = len(batch)

    def cut(value: Any) -> Any:
        if isinstance(value, (torch.Tensor, list, tuple)) and len(value) == size:
            return value[start:end]
        return value
    return dataclasses.replace(batch, latents=batch.latents[start:end], prompts=batch.prompts[start:end],
                               size_cond=cut(batch.size_cond), loss_weight=cut(batch.loss_weight),
                               pixels=cut(batch.pixels), image_paths=cut(batch.image_paths),
                               extras={k: cut(v) for k, v in batch.extras.items()})


class Processes:
    """One process: the whole batch is its share, and every collective returns its input."""

    rank = 0
    world = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes artefacts, previews, the loss CSV and the resume state, and emits events."""
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        """The device the launcher gave this process; None: the caller chooses."""
        return None

    def largest_share(self, size: int) -> int:
        """The most samples of a `size`-sample micro-batch any process trains on (what its memory must hold)."""
        start, end = shard_bounds(size, 0, self.world)
        return end - start

    def shard(self, batch: DataBatch) -> Shard:
        """This process's slice of a global micro-batch."""
        if self.world == 1:
            return Shard(batch, 0, 1.0)
        start, end = shard_bounds(len(batch), self.rank, self.world)
        return Shard(slice_batch(batch, start, end), start, (end - start) / max(1, len(batch)))

    def backward(self, loss: torch.Tensor, params: Sequence[torch.Tensor], ends_step: bool) -> None:
        """Backpropagate `loss` into `params`' gradients; `ends_step`: the last backward before `sum_gradients`
        (several processes start summing gradients while it runs)."""
        loss.backward()

    def sum_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Sum every parameter's gradient over the processes (a process without samples adds zeros)."""

    def total(self, value: float) -> float:
        """The sum of `value` over the processes."""
        return value

    def agree(self, flags: Sequence[bool]) -> list[bool]:
        """Each flag true when it is true in any process (an interrupt seen by one stops all at the same step)."""
        return list(flags)

    def share(self, value: T) -> T:
        """The main process's `value` in every process (a run folder, a seed drawn from the OS)."""
        return value

    def share_params(self, params: Sequence[torch.Tensor]) -> None:
        """Copy the main process's parameter values into every process."""

    def barrier(self) -> None:
        """Wait until every process gets here."""


class AccelerateProcesses(Processes):
    """The processes of an `accelerate launch` run, over accelerate's initialised process group."""

    def __init__(self, cpu: bool) -> None:
        from accelerate import PartialState  # only here: the WebUI has no accelerate, and needs none

        self.state = PartialState(cpu=cpu)
        self.rank = int(self.state.process_index)
        self.world = int(self.state.num_processes)
        self._reduce: OverlappedReduce | None = None
        self.overlapped_buckets = 0  # gradient buckets summed while a backward still ran, over this process's jobs

    @property
    def device(self) -> torch.device:  # type: ignore[override]  # always known once launched
        """This process's device (cuda:<local rank> on a multi-GPU machine, the CPU otherwise)."""
        return torch.device(self.state.device)

    def backward(self, loss: torch.Tensor, params: Sequence[torch.Tensor], ends_step: bool) -> None:
        if not ends_step:
            loss.backward()
            return
        reduce = self._overlapped(params)
        reduce.active = True
        try:
            loss.backward()
        finally:
            reduce.active = False
        self.overlapped_buckets += reduce.started

    def sum_gradients(self, params: Sequence[torch.Tensor]) -> None:
        self._overlapped(params).finish()

    def _overlapped(self, params: Sequence[torch.Tensor]) -> OverlappedReduce:
        if self._reduce is None or not self._reduce.covers(params):
            if self._reduce is not None:  # another job's parameters: its hooks go
                self._reduce.close()
            self._reduce = OverlappedReduce(params)
        return self._reduce

    def total(self, value: float) -> float:
        from accelerate.utils import reduce
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(reduce(tensor, reduction="sum").item())

    def agree(self, flags: Sequence[bool]) -> list[bool]:
        from accelerate.utils import reduce
        tensor = torch.tensor([float(f) for f in flags], dtype=torch.float32, device=self.device)
        return [bool(v > 0) for v in reduce(tensor, reduction="sum").tolist()]

    def share(self, value: T) -> T:
        from accelerate.utils import broadcast_object_list
        return broadcast_object_list([value], from_process=0)[0]

    def share_params(self, params: Sequence[torch.Tensor]) -> None:
        from accelerate.utils import broadcast
        with torch.no_grad():
            for p in params:
                p.copy_(broadcast(p.detach().clone(), from_process=0))

    def barrier(self) -> None:
        self.state.wait_for_everyone()


class OverlappedReduce:
    """The gradient all-reduce of one set of parameters, overlapped with the backward as DDP does it.

    The parameters are split into buckets in reverse order (the backward reaches the last layers first). During the
    backward that ends a step (`active`), a hook on each parameter notes its gradient is final; a bucket whose
    gradients are all final is summed across processes asynchronously while the backward goes on. Buckets are
    started strictly in order, so every process issues the same collectives in the same order even when one has no
    samples this step (it starts them all in `finish`) or a parameter got no gradient (its bucket and those after it
    wait for `finish`). Flattened buckets, because one all-reduce per tensor is slow for hundreds of LoRA tensors.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        self.active = False
        self.buckets = _buckets(list(reversed(self.params)))
        self._bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self._hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in self.params if p.requires_grad]
        self._reset()

    def covers(self, params: Sequence[torch.Tensor]) -> bool:
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()

    @property
    def started(self) -> int:
        """Buckets started so far in this step (after the backward: those it overlapped)."""
        return len(self._started)

    def _reset(self) -> None:
        self._waiting = [len(bucket) for bucket in self.buckets]
        self._started: list[tuple[torch.Tensor, Any]] = []

    def _ready(self, param: torch.Tensor) -> None:
        if not self.active:
            return
        self._waiting[self._bucket_of[id(param)]] -= 1
        while len(self._started) < len(self.buckets) and self._waiting[len(self._started)] == 0:
            self._start(len(self._started))

    def _start(self, index: int) -> None:
        import torch.distributed as dist
        grads = []
        for p in self.buckets[index]:
            if p.grad is None:  # no samples here, or the parameter took no part: it adds zeros
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._started.append((flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)))

    def finish(self) -> None:
        """Start the buckets the backward did not, wait for all, and write the sums into the gradients."""
        try:
            for index in range(len(self._started), len(self.buckets)):
                self._start(index)
            for bucket, (flat, work) in zip(self.buckets, self._started):
                work.wait()
                offset = 0
                for p in bucket:
                    p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))  # type: ignore[union-attr]
                    offset += p.numel()
        finally:
            self._reset()


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive tensors of one dtype and device, up to GRADIENT_BUCKET elements each."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        last = buckets[-1] if buckets else None
        if last is not None and size + t.numel() <= GRADIENT_BUCKET and \
                (last[0].dtype, last[0].device) == (t.dtype, t.device):
            last.append(t)
            size += t.numel()
        else:
            buckets.append([t])
            size = t.numel()
    return buckets


def launched_world() -> int:
    """How many processes the launcher (accelerate launch, torchrun) started; 1 when run plainly."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 when run plainly), readable before any process group exists."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def join_processes(device: str | None) -> Processes:
    """The processes of this run: accelerate's group when a launcher started several, else one process."""
    if launched_world() == 1:
        return Processes()
    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    return AccelerateProcesses(cpu=cpu)
