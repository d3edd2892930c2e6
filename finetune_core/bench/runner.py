"""`python -m finetune_core bench`: every case in its own processes, repeated, with the machine's state beside it.

A case is a (model, method) pair. Each run of a case is a fresh process (peak memory, page faults, environment
variables and the time to first step are then its own). With `--compare A B` the two settings alternate in rounds,
A B then B A (a slow drift of the machine then biases neither side), and each round gives one ratio B/A.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from finetune_core.bench import report
from finetune_core.bench.case import FULL_SD15, RESULT_MARKER, TINY, RunResult, RunSpec, request_settings
from finetune_core.bench.records import BenchOptions, CaseRuns, RunRecord
from finetune_core.bench.run_settings import RunSettings, parse_settings
from finetune_core.errors import ConfigError

_CHILD = ("import sys, time; t = time.perf_counter(); from finetune_core.bench.case import child_main; "
          "child_main(sys.argv[1], t)")
BUSY_SHARE = 0.10  # flag a run during which other processes used more than this share of all CPUs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `bench` command's flags."""
    from finetune_core.methods import METHODS
    parser.add_argument("--full", action="store_true", help=f"also the full-size SD1.5 architecture ({FULL_SD15}, "
                        "random weights) at 256x256")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (after one untimed first step)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case and setting, each its own process")
    parser.add_argument("--models", default=",".join(TINY), help="tiny model names, sd15-full, or checkpoint paths")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to time")
    parser.add_argument("--set", default="", metavar="SETTINGS",
                        help="settings of every run, e.g. 'batch_size=2,threads=1,MALLOC_ARENA_MAX=2': method, "
                        "data or train settings, threads, device, channels_last, unet_grads, or environment "
                        "variables in capitals")
    parser.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"),
                        help="time each case under settings A and B in alternating runs and print B/A, e.g. "
                        "--compare 'threads=1' 'threads=2'")
    parser.add_argument("--margin", type=float, default=0.10,
                        help="flag a run whose matmul rates before and after differ by more than this fraction")
    parser.add_argument("--profile", default=None, metavar="PREFIX",
                        help="write a torch.profiler table of each run's timed steps to PREFIX.<case>.txt")


def run_bench(options: BenchOptions) -> list[CaseRuns]:
    """Check every request first (nothing runs if one is wrong), then run and print case after case."""
    cases = plan_cases(options)
    report.print_header(options)
    done = []
    for case in cases:
        done.append(run_case(case, options))
        report.print_case(done[-1], options)
    return done


def plan_cases(options: BenchOptions) -> list[CaseRuns]:
    """The cases with their parsed settings; a ConfigError naming every problem before anything runs."""
    problems = [f"--{name} must be at least 1, not {value}" for name, value in
                (("steps", options.steps), ("repeats", options.repeats)) if value < 1]
    if not 0 < options.margin < 1:
        problems.append(f"--margin must be a fraction between 0 and 1, not {options.margin}")
    problems += [_model_problem(m) for m in options.models if _model_problem(m)]
    cases = []
    for model in (m for m in options.models if not _model_problem(m)):
        for method in options.methods:
            try:
                cases.append(_case(model, method, options))
            except ConfigError as exc:
                problems.extend(f"{model} / {method}: {p}" for p in exc.problems)
    if problems:
        raise ConfigError(sorted(set(problems), key=problems.index))
    return cases


def _model_problem(model: str) -> str:
    if model in (*TINY, FULL_SD15) or Path(model).expanduser().exists():
        return ""
    return f"there is no model {model!r}: give {', '.join(TINY)}, {FULL_SD15} or the path of a checkpoint or folder"


def _case(model: str, method: str, options: BenchOptions) -> CaseRuns:
    base = parse_settings(options.base, method)
    sides = {"": base} if options.compare is None else \
        {label: base.merged(parse_settings(text, method)) for label, text in zip("AB", options.compare)}
    problems = []
    for settings in sides.values():
        try:
            validate(model, method, settings, options.steps)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return CaseRuns(model, method, sides, {label: [] for label in sides})


def validate(model: str, method: str, settings: RunSettings, steps: int) -> None:
    """Build the configs a run would build, so a bad value fails here and not in the middle of the bench."""
    from finetune_core.data.dataset_config import DatasetConfig
    from finetune_core.jobs import service
    from finetune_core.train.train_config import TrainConfig
    spec, defaults = service.method_spec(method), service.form_defaults(method)
    values = request_settings(model, method, settings.to_dict(), steps)
    problems: list[str] = []
    for section, config_type, extra in (("method", spec.config_type, {}), ("data", DatasetConfig,
                                        {"placeholder": "bench"}), ("train", TrainConfig, {})):
        try:
            service.build_config(config_type, defaults[section], {**values[section], **extra}, section)
        except ConfigError as exc:
            problems.extend(exc.problems)
    for key in ("threads", "processes"):
        value = settings.run.get(key)
        if value is not None and (not value.isdigit() or int(value) < 1):
            problems.append(f"{key} must be a whole number of at least 1, not {value!r}")
    problems += _processes_problems(settings.run.get("processes", "1"))
    for flag in ("channels_last", "unet_grads"):
        if settings.run.get(flag, "false").lower() not in ("1", "0", "true", "false", "yes", "no"):
            problems.append(f"{flag} must be true or false, not {settings.run[flag]!r}")
    if "device" in settings.run:
        problems += _device_problems(settings.run["device"])
    if problems:
        raise ConfigError(problems)


def _processes_problems(processes: str) -> list[str]:
    """Several processes are started by accelerate launch, which must be installed."""
    if not processes.isdigit() or int(processes) < 2:
        return []
    import importlib.util
    if importlib.util.find_spec("accelerate") is None:
        return [f"processes={processes} needs the accelerate package (pip install 'accelerate>=0.21')"]
    return []


def _device_problems(device: str) -> list[str]:
    import torch
    try:
        kind = torch.device(device).type
    except RuntimeError:
        return [f"device {device!r} is not a device name; use cpu, cuda or cuda:N"]
    if kind == "cuda" and not torch.cuda.is_available():
        return [f"device {device!r} was asked for, but torch sees no CUDA device here"]
    return []


def run_case(case: CaseRuns, options: BenchOptions) -> CaseRuns:
    """All runs of one case; sides alternate A B, B A, ... so each round's ratio sees the same machine."""
    labels = list(case.sides)
    for round_index in range(options.repeats):
        for label in labels if round_index % 2 == 0 else labels[::-1]:
            profile = _profile_path(options, case, label, round_index)
            spec = RunSpec(case.model, case.method, case.sides[label].to_dict(), options.steps,
                           count_flops=not case.runs[label], profile_path=profile)
            record = run_once(spec, case.sides[label].env)
            record.flags = flags_of(record, options.margin)
            case.runs[label].append(record)
    return case


def _profile_path(options: BenchOptions, case: CaseRuns, label: str, round_index: int) -> str | None:
    if not options.profile:
        return None
    name = f"{case.model}-{case.method}{'-' + label if label else ''}-{round_index + 1}".replace(os.sep, "_")
    return f"{options.profile}.{name}.txt"


def run_once(spec: RunSpec, env: dict[str, str]) -> RunRecord:
    """Run one measurement in a fresh process and note the load before it and the other processes' CPU during it."""
    from finetune_core.cpu import PROCESS_ENV_DEFAULTS
    child_env = {**PROCESS_ENV_DEFAULTS, **os.environ, **env}
    root = str(Path(__file__).resolve().parents[2])
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    busy, own, wall = busy_seconds(), own_seconds(), time.perf_counter()
    command = [sys.executable, "-c", _CHILD, json.dumps(spec.__dict__)]
    processes = int(spec.settings.get("run", {}).get("processes", 1))
    if processes > 1:  # the same run in N processes; the main one prints the result
        from finetune_core.jobs.launcher import accelerate_launch
        command = accelerate_launch(processes, "finetune_core.bench.case", [json.dumps(spec.__dict__)])
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=child_env)
    wall = time.perf_counter() - wall
    busy_after = busy_seconds()
    others = None if busy is None or busy_after is None else \
        max(0.0, (busy_after - busy) - (own_seconds() - own)) / (wall * (os.cpu_count() or 1))
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return RunRecord(None, load, others, error=f"exit {done.returncode}: {tail}")
    return RunRecord(RunResult(**json.loads(lines[-1][len(RESULT_MARKER):])), load, others)


def busy_seconds() -> float | None:
    """CPU seconds all processes have spent (Linux /proc/stat: user, nice, system, irq, softirq)."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            values = [int(v) for v in handle.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = values
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds of this process and its finished children (the runs)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def flags_of(record: RunRecord, margin: float) -> list[str]:
    """Why a run's figures may not be trustworthy: the matmul rate moved, or other processes were busy."""
    flags = []
    result = record.result
    if result is not None:
        low, high = sorted((result.matmul_before, result.matmul_after))
        if high > 0 and (high - low) / high > margin:
            flags.append(f"matmul rate moved {result.matmul_before:.0f} -> {result.matmul_after:.0f} GFLOP/s "
                         f"({result.matmul_after / result.matmul_before - 1:+.0%}, margin {margin:.0%})")
    if record.others is not None and record.others > BUSY_SHARE:
        flags.append(f"other processes used {record.others:.0%} of the CPUs during the run")
    return flags
