"""Training on a CPU: OpenMP waiting, the allocator, the thread count, and which autocast precisions run natively.

Measured on a shared 2-core machine (README, Benchmarks): OpenMP threads that busy-wait fight other processes for
the cores and a step can become many times slower; threads that wait passively do not. bf16/fp16 autocast on a CPU
without native support (AVX512-BF16/AMX, AVX512-FP16/AMX-FP16) runs through slow conversion paths: 14-40x slower
than fp32, so such a request is refused before it starts.

This module imports torch only inside functions: `prepare_process` must run before torch is first imported.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from finetune_core.errors import ConfigError

logger = logging.getLogger(__name__)

# Read by the OpenMP runtime once, when torch loads it; PASSIVE makes idle threads sleep instead of spinning.
PROCESS_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
ALLOCATOR_ENV = "FINETUNE_ALLOCATOR"  # "system": leave malloc as it is (see keep_freed_memory)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
# What each autocast precision needs to run at full speed: torch's own probe, else these /proc/cpuinfo flags.
_TORCH_PROBES = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}
_NATIVE_FLAGS = {"bf16": {"avx512_bf16", "amx_bf16", "bf16"}, "fp16": {"avx512_fp16", "amx_fp16", "asimdhp"}}
_NEEDS = {"bf16": "AVX512-BF16 or AMX", "fp16": "AVX512-FP16 or AMX-FP16"}


def prepare_process(environ: MutableMapping[str, str] = os.environ) -> bool:
    """At the start of our own process (CLI, app, bench run): passive OpenMP waiting and an allocator that keeps
    freed memory, each unless the user chose otherwise; False (nothing done) when torch was imported first."""
    if "torch" in sys.modules:
        logger.debug("torch is already imported; OpenMP keeps the wait policy it started with")
        return False
    for name, value in PROCESS_ENV_DEFAULTS.items():
        environ.setdefault(name, value)
    keep_freed_memory(environ)
    return True


def keep_freed_memory(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system; True when applied.

    oneDNN reorders every convolution weight into a fresh buffer on each call (56 MiB for the largest SD1.5 UNet
    weight); glibc serves such sizes with mmap and gives them back on free, so each step faulted about 600,000 pages
    in again (README, Benchmarks). With mmap off and trimming off, those buffers come from the heap and are reused.
    Left alone when the user set `FINETUNE_ALLOCATOR=system`, any `MALLOC_*` tuning, `GLIBC_TUNABLES`, or preloads
    another allocator (jemalloc, tcmalloc).
    """
    chosen = [k for k in environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]
    if environ.get(ALLOCATOR_ENV, "keep") == "system" or chosen or "malloc" in environ.get("LD_PRELOAD", ""):
        return False
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success; M_TRIM_THRESHOLD -1 turns trimming off, M_MMAP_MAX 0 turns mmap off (glibc
    # still falls back to mmap when the heap cannot grow, so no allocation fails because of this)
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, -1)) and bool(libc.mallopt(_M_MMAP_MAX, 0))


def _glibc() -> Any:
    """The C library when it is glibc (Linux), else None."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads (None: torch's default, one per physical core); returns the count in use."""
    import torch

    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be a whole number of at least 1, not {threads!r}")
        torch.set_num_threads(threads)
    return int(torch.get_num_threads())


def native_autocast(precision: str) -> bool | None:
    """Whether this CPU runs `precision` ("bf16"/"fp16") autocast natively; None when it cannot be told."""
    import torch

    try:  # torch's own answer (oneDNN's fast paths); older builds may lack the probe
        if torch.backends.mkldnn.is_available():
            return bool(getattr(torch.ops.mkldnn, _TORCH_PROBES[precision])())
    except (AttributeError, RuntimeError):
        pass
    flags = cpu_flags()
    return bool(flags & _NATIVE_FLAGS[precision]) if flags else None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def autocast_problem(device: Any, precision: str) -> str | None:
    """A sentence refusing fp16/bf16 autocast on a CPU that would run it through slow paths, else None."""
    if precision not in _TORCH_PROBES or getattr(device, "type", str(device)) != "cpu":
        return None
    if native_autocast(precision) is not False:
        return None
    return (f"precision {precision} on this CPU (it has no {_NEEDS[precision]}) runs through slow conversion "
            f"paths and makes every step 14-40x slower than fp32; set Precision (precision) to fp32, which is the "
            f"fast choice on this CPU")
