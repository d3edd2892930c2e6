"""`python -m finetune_core bench`: seconds per step with their spread, time to first step, page faults, memory and
the compute floor per case, with the machine's load and matmul rate around every run; `--compare` gives ratios."""

from finetune_core.bench.records import BenchOptions
from finetune_core.bench.run_settings import RunSettings, parse_settings
from finetune_core.bench.runner import add_arguments, run_bench

__all__ = ["BenchOptions", "add_arguments", "RunSettings", "parse_settings", "run_bench"]
