"""What the bench plans and records: its options, each case's runs and each run with the machine's state beside it
(the runner fills them, the report prints them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune_core.bench.case import FULL_SD15, RunResult
from finetune_core.bench.run_settings import RunSettings


@dataclass(frozen=True)
class BenchOptions:
    models: list[str]
    methods: list[str]
    steps: int = 5
    repeats: int = 3
    base: str = ""  # --set: settings of every run
    compare: tuple[str, str] | None = None
    margin: float = 0.10
    threads: int | None = None
    profile: str | None = None  # file name prefix of the per-run profiler tables

    @classmethod
    def from_args(cls, args: Any) -> BenchOptions:
        # dict.fromkeys: `--full --models sd15-full` names the full-size model twice; it runs once.
        models = list(dict.fromkeys([m for m in args.models.split(",") if m] + ([FULL_SD15] if args.full else [])))
        base = ",".join(p for p in (f"threads={args.threads}" if args.threads is not None else "", args.set) if p)
        return cls(models, [m for m in args.methods.split(",") if m], args.steps, args.repeats, base,
                   tuple(args.compare) if args.compare else None, args.margin, args.threads, args.profile)


@dataclass
class RunRecord:
    """One run with the state of the machine around it (or why it failed)."""

    result: RunResult | None
    load: float  # 1-minute load average right before the run
    others: float | None  # share of all CPUs other processes used during the run
    error: str = ""
    flags: list[str] = field(default_factory=list)


@dataclass
class CaseRuns:
    model: str
    method: str
    sides: dict[str, RunSettings]  # "" for a plain run, or "A" and "B"
    runs: dict[str, list[RunRecord]]
