"""The bench's printed figures: one row per case (or per side of a comparison), the B/A ratios, and the flags.

s/step is the median over runs of each run's median step time; spread is (max - min) / median of those run medians;
the compute floor is the counted FLOPs of one step over the median float32 matmul rate of the case's runs, and
"achieved" is that floor over s/step.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

from finetune_core.bench.records import BenchOptions, CaseRuns, RunRecord

COLUMNS = (f"{'model':<12} {'method':<18} {'size':>7} {'set':>3} {'s/step':>8} {'spread':>6} {'CPU s':>7} "
           f"{'1st step':>8} "
           f"{'faults/step':>11} {'peak RSS':>9} {'GFLOP':>7} {'floor s':>8} {'achieved':>8} {'matmul GF/s':>11} "
           f"{'load':>5} {'others':>6}")


@dataclass(frozen=True)
class SideSummary:
    """The runs of one side of a case, summarised."""

    runs: int
    seconds_per_step: float
    spread: float | None
    first_step: float
    phases: dict[str, float]
    faults_per_step: float
    cpu_seconds_per_step: float
    peak_mib: float
    step_gflop: float | None
    matmul: tuple[float, float]  # lowest and highest rate measured around the runs
    matmul_median: float
    load: float
    others: float | None
    size: str
    images_seconds: float = 0.0  # median VAE encoding of images first drawn in the timed steps (not in s/step)

    @property
    def floor_seconds(self) -> float | None:
        return self.step_gflop / self.matmul_median if self.step_gflop else None

    @property
    def achieved(self) -> float | None:
        floor = self.floor_seconds
        return floor / self.seconds_per_step if floor else None


def summarize(records: list[RunRecord]) -> SideSummary | None:
    """None when no run of the side succeeded."""
    good = [r for r in records if r.result is not None]
    results = [r.result for r in good if r.result is not None]
    if not results:
        return None
    per_run = [r.seconds_per_step for r in results]
    middle = statistics.median(per_run)
    rates = [x for r in results for x in (r.matmul_before, r.matmul_after)]
    gflop = next((r.step_gflop for r in results if r.step_gflop), None)
    peak = max((r.peak_device_mib if r.peak_device_mib is not None else r.peak_rss_mib) for r in results)
    others = [r.others for r in good if r.others is not None]
    return SideSummary(
        len(results), middle, (max(per_run) - min(per_run)) / middle if len(results) > 1 else None,
        statistics.median(r.first_step_seconds for r in results),
        {k: statistics.median(r.phases.get(k, 0.0) for r in results) for k in dict.fromkeys(
            k for r in results for k in r.phases)},
        statistics.median(r.faults_per_step for r in results),
        statistics.median(r.cpu_seconds_per_step for r in results), peak, gflop, (min(rates), max(rates)),
        statistics.median(rates), max(r.load for r in good), max(others) if others else None, results[0].size,
        statistics.median(r.images_seconds for r in results))


def print_header(options: BenchOptions) -> None:
    import torch
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "?"
    env = ", ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(("OMP_", "MALLOC_", "LD_PRE")))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"torch {torch.__version__} ({capability}), {os.cpu_count()} CPUs, load {load}; {options.repeats} runs per "
          f"case (each its own process), {options.steps} timed steps per run{'; ' + env if env else ''}")
    if options.base:
        print(f"every run: {options.base}")
    if options.compare:
        print(f"compare A: {options.compare[0] or '(defaults)'}  B: {options.compare[1] or '(defaults)'}; rounds "
              f"alternate A B / B A")
    if options.profile:
        print(f"profiling every run (step times include the profiler's overhead) into {options.profile}.*.txt")
    print(COLUMNS)


def print_case(case: CaseRuns, options: BenchOptions) -> None:
    summaries = {label: summarize(runs) for label, runs in case.runs.items()}
    for label, summary in summaries.items():
        print(_row(case, label, summary))
        if summary is not None:
            processes = int(case.sides[label].run.get("processes", 1))
            # with several processes CPU s, faults, memory and GFLOP are the main process's (its share of the batch)
            whose = f" (per-process figures: the main one of {processes})" if processes > 1 else ""
            later = f"; {summary.images_seconds:.2f} s encoding images first drawn in the timed steps (left out " \
                "of their times)" if summary.images_seconds >= 0.005 else ""
            print(f"{'':>12}   {1 / summary.seconds_per_step:.2f} steps/s{whose}; first step {summary.first_step:.1f} "
                  "s = " + " + ".join(f"{k} {v:.2f}" for k, v in summary.phases.items()) + later)
        for index, record in enumerate(case.runs[label], start=1):
            where = f"run {index}{' (' + label + ')' if label else ''}"
            if record.error:
                print(f"{'':>12}   x {where} failed: {record.error}")
            for flag in record.flags:
                print(f"{'':>12}   ! {where}: {flag}")
    if options.compare:
        print(_ratios(case, summaries))


def _row(case: CaseRuns, label: str, s: SideSummary | None) -> str:
    start = f"{case.model[-12:]:<12} {case.method:<18}"
    if s is None:
        return f"{start} {'':>7} {label:>3} every run failed"
    spread = f"{s.spread:.1%}" if s.spread is not None else "-"
    floor = f"{s.floor_seconds:.4f}" if s.floor_seconds else "-"
    achieved = f"{s.achieved:.1%}" if s.achieved else "-"
    gflop = f"{s.step_gflop:.1f}" if s.step_gflop else "-"
    others = f"{s.others:.0%}" if s.others is not None else "-"
    return (f"{start} {s.size:>7} {label:>3} {s.seconds_per_step:>8.4f} {spread:>6} {s.cpu_seconds_per_step:>7.3f} "
            f"{s.first_step:>7.1f}s "
            f"{s.faults_per_step:>11,.0f} {s.peak_mib:>5.0f} MiB {gflop:>7} {floor:>8} {achieved:>8} "
            f"{s.matmul[0]:>5.0f}-{s.matmul[1]:<5.0f} {s.load:>5.2f} {others:>6}")


def _ratios(case: CaseRuns, summaries: dict[str, SideSummary | None]) -> str:
    """B/A of s/step per round (median and range), and of the other medians."""
    a, b = summaries.get("A"), summaries.get("B")
    if a is None or b is None:
        return f"{'':>12}   B/A: no ratio (a side has no successful run)"
    rounds = [rb.result.seconds_per_step / ra.result.seconds_per_step
              for ra, rb in zip(case.runs["A"], case.runs["B"]) if ra.result and rb.result]
    spread = f" (rounds {min(rounds):.3f}-{max(rounds):.3f})" if len(rounds) > 1 else ""
    cpu = [rb.result.cpu_seconds_per_step / ra.result.cpu_seconds_per_step
           for ra, rb in zip(case.runs["A"], case.runs["B"]) if ra.result and rb.result]
    cpu_spread = f" (rounds {min(cpu):.3f}-{max(cpu):.3f})" if len(cpu) > 1 else ""
    return (f"{'':>12}   B/A: s/step {statistics.median(rounds):.3f}x{spread}, CPU s/step "
            f"{statistics.median(cpu):.3f}x{cpu_spread}, first step {b.first_step / a.first_step:.2f}x, "
            f"faults/step {a.faults_per_step:,.0f} -> {b.faults_per_step:,.0f}, peak memory "
            f"{b.peak_mib / a.peak_mib:.2f}x")
