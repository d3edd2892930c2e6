"""`train --num-processes N`: start the same command as N data-parallel processes through `accelerate launch`.

The request is checked here first, in one process, so a bad setting is one sentence before anything starts; the
processes then join accelerate's process group (`finetune_core.train.distributed`). When one of them dies, the
launcher ends the others and this process says so in one sentence, naming the run folder to resume from: every
file was written atomically, so the last saved copy and resume state are intact.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from finetune_core.errors import ConfigError, FinetuneError

FLAG = "--num-processes"


class ProcessesFailed(FinetuneError):
    """A process of a data-parallel run stopped with an error; the others were ended by the launcher."""


def without_flag(argv: Sequence[str]) -> list[str]:
    """The command line with `--num-processes N` (or `--num-processes=N`) taken out."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == FLAG:
            skip = True
        elif not arg.startswith(FLAG + "="):
            out.append(arg)
    return out


def launch_command(argv: Sequence[str], processes: int, cpu: bool) -> list[str]:
    """`accelerate launch` of `python -m finetune_core <argv>` on `processes` processes of this machine.

    torchrun starts them (accelerate's multi-GPU launcher); on a machine without GPUs they join over gloo, each
    told to use the CPU.
    """
    args = without_flag(argv)
    if cpu and "--device" not in args:
        args += ["--device", "cpu"]
    return accelerate_launch(processes, "finetune_core", args)


def accelerate_launch(processes: int, module: str, args: Sequence[str]) -> list[str]:
    """`accelerate launch` of `python -m <module> <args>` on `processes` processes of this machine, with every
    choice it would otherwise warn about made (no config file needed)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", module, *args]


def launch(argv: Sequence[str], processes: int, device: str | None, runs: Path) -> int:
    """Run the command on `processes` processes and return its exit status; ProcessesFailed when one died."""
    import torch
    try:
        import accelerate  # noqa: F401  (the standalone extra installs it; the WebUI never comes here)
    except ImportError as exc:
        raise ConfigError("--num-processes needs the accelerate package; install it with "
                          "pip install 'accelerate>=0.21' (the standalone extra has it)") from exc
    if processes > 1 and not torch.cuda.is_available() and device not in (None, "cpu"):
        raise ConfigError(f"--device {device} is not available here; leave --device out to train on the CPU")
    cpu = device == "cpu" or not torch.cuda.is_available()
    if not cpu and torch.cuda.device_count() < processes:
        raise ConfigError(f"--num-processes {processes} needs {processes} GPUs, and this machine has "
                          f"{torch.cuda.device_count()}; ask for at most that many")
    before = _run_stamps(runs)
    status = subprocess.call(launch_command(argv, processes, cpu))
    if status in (0, 130):
        return status
    run = newest_run(runs, before)
    where = f"; resume it with --resume {run}" if run is not None else ""
    raise ProcessesFailed(f"a training process stopped with an error (exit status {status}; the report is above) "
                          f"and the others were ended. Every file saved so far is complete{where}")


def _run_stamps(runs: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in Path(runs).glob("*/*/*/request.json")}


def newest_run(runs: Path, before: dict[Path, int]) -> Path | None:
    """The run folder this launch wrote (a request.json new or rewritten since `before`), if any.

    Compared with the files as they were, not with the clock: a file's time is coarser than time.time() and can
    read as a few milliseconds before the launch that wrote it."""
    now = _run_stamps(runs)
    found = [p for p, stamp in now.items() if before.get(p) != stamp]
    if not found:
        return None
    return max(found, key=lambda p: now[p]).parent
