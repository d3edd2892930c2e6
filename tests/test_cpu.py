"""CPU pitfalls: passive OpenMP waiting is set before torch loads, --threads, and slow autocast is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune_core import cpu
from finetune_core.errors import ConfigError
from finetune_core.jobs import service
from tests.conftest import REPO


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


def test_prepare_process_sets_passive_waiting_only_before_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = FakeLibc()
    monkeypatch.setattr(cpu, "_glibc", lambda: libc)  # never change this test process's allocator
    env: dict[str, str] = {}
    assert cpu.prepare_process(env) is False and env == {}  # torch is loaded in this process: too late
    monkeypatch.delitem(sys.modules, "torch")
    assert cpu.prepare_process(env) is True and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert libc.calls == [(-1, -1), (-4, 0)]  # trimming off, mmap off
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    cpu.prepare_process(mine)
    assert mine == {"OMP_WAIT_POLICY": "ACTIVE"}  # the user's own choice stays


@pytest.mark.parametrize("env", [{"FINETUNE_ALLOCATOR": "system"}, {"MALLOC_ARENA_MAX": "2"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
                                 {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}])
def test_the_allocator_is_left_alone_when_the_user_chose_one(monkeypatch: pytest.MonkeyPatch,
                                                             env: dict[str, str]) -> None:
    libc = FakeLibc()
    monkeypatch.setattr(cpu, "_glibc", lambda: libc)
    assert cpu.keep_freed_memory(env) is False and libc.calls == []
    monkeypatch.setattr(cpu, "_glibc", lambda: None)  # not glibc (musl, macOS, Windows): nothing to do
    assert cpu.keep_freed_memory({}) is False


def test_the_command_line_keeps_freed_memory_and_waits_passively() -> None:
    """Set by `main` before torch loads: OpenMP's wait policy, and a malloc that keeps the 36 MiB reorder buffer of a
    large convolution's weight for the next call instead of faulting it in again (counted in page faults)."""
    import platform
    code = ("import os, resource, sys; from finetune_core.cli import main; main(['inspect', '/no/such/file']); "
            "import torch; torch.set_num_threads(1); "
            "conv = torch.nn.Conv2d(1024, 1024, 3, padding=1).requires_grad_(False); "
            "x = torch.randn(1, 1024, 8, 8); conv(x); conv(x); "
            "f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; conv(x); "
            "print(os.environ.get('OMP_WAIT_POLICY'), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MALLOC_", "OMP_")) and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    children = {choice: subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, cwd=REPO,
                                         env={**env, "FINETUNE_ALLOCATOR": choice})
                for choice in ("system", "keep")}  # side by side: half the wait
    out = {}
    for choice, child in children.items():
        stdout, stderr = child.communicate(timeout=300)
        assert child.returncode == 0, stderr
        policy, faults = stdout.split()[-2:]
        out[choice] = (policy, int(faults))
    assert out["keep"][0] == out["system"][0] == "PASSIVE"
    if platform.libc_ver()[0] == "glibc":
        assert out["system"][1] > 5000 and out["keep"][1] < 500, out


def test_set_threads() -> None:
    before = torch.get_num_threads()
    try:
        assert cpu.set_threads(1) == 1 and torch.get_num_threads() == 1
        assert cpu.set_threads(None) == 1
    finally:
        torch.set_num_threads(before)
    for bad in (0, -2, True, 1.5):
        with pytest.raises(ConfigError, match="threads"):
            cpu.set_threads(bad)  # type: ignore[arg-type]


def test_native_autocast_falls_back_to_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # as if torch had no probe
    for flags, expected in (({"avx2", "avx512_bf16"}, True), ({"avx2", "fma"}, False), (set(), None)):
        monkeypatch.setattr(cpu, "cpu_flags", lambda flags=flags: flags)
        assert cpu.native_autocast("bf16") is expected
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"amx_fp16"})
    assert cpu.native_autocast("fp16") is True and cpu.native_autocast("bf16") is False


def test_cpu_flags_reads_proc_cpuinfo() -> None:
    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = cpu.cpu_flags()
    assert flags and all(" " not in f for f in flags)


def test_autocast_problem_only_for_slow_cpu_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "native_autocast", lambda precision: False)
    problem = cpu.autocast_problem(torch.device("cpu"), "bf16")
    assert problem is not None and "precision bf16" in problem and "fp32" in problem
    assert cpu.autocast_problem(torch.device("cpu"), "fp32") is None
    assert cpu.autocast_problem(torch.device("cuda"), "fp16") is None
    monkeypatch.setattr(cpu, "native_autocast", lambda precision: None)  # cannot tell: let it run
    assert cpu.autocast_problem(torch.device("cpu"), "bf16") is None


def test_slow_autocast_never_starts_a_job(monkeypatch: pytest.MonkeyPatch, tiny_model, tmp_path: Path,
                                         one_image_dataset: Path) -> None:
    monkeypatch.setattr(cpu, "native_autocast", lambda precision: False)
    request = service.TrainRequest("textual-inversion", "slowword", {}, {"data_dir": str(one_image_dataset)},
                                   {"precision": "bf16", "steps": 1})
    folders = service.OutputFolders.standalone(tmp_path / "out")
    with pytest.raises(ConfigError, match="Precision \\(precision\\) to fp32"):
        service.train(request, tiny_model("tiny-sd1"), folders)
    assert not (tmp_path / "out").exists()
