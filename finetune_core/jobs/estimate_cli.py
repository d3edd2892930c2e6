"""`python -m finetune_core estimate METHOD --model MODEL [settings] [--fit SIZE] [--json]`: the measured peak
memory of a training run, and with --fit (or on a CUDA machine, for its free memory) the cheapest changes that fit.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from finetune_core.jobs.fit import CARD_RESERVE, Request, report
from finetune_core.methods import METHODS
from finetune_core.model.full_size import FULL_SIZE
from finetune_core.model.tiny import TINY_MODELS
from finetune_core.train.memory import Hardware, gib


def add_parser(commands: Any, add_settings_flags: Any, setting_types: dict[str, type]) -> None:
    """The `estimate` command with one sub-command per method, taking the training settings the method has (the
    flags made by the command line's `add_settings_flags`, as for `train`)."""

    estimate = commands.add_parser("estimate", help="measure a run's peak GPU memory without a GPU, and plan a fit")
    methods = estimate.add_subparsers(dest="method", required=True)
    for spec in METHODS.values():
        sub = methods.add_parser(spec.key, help=spec.description, description=__doc__.splitlines()[0])
        sub.add_argument("--model", required=True,
                         help=f"the architecture: {', '.join([*FULL_SIZE, *TINY_MODELS])}")
        sub.add_argument("--fit", default=None, metavar="SIZE",
                         help="plan the changes that fit this card, like 8GB (default: this CUDA device's free "
                              "memory; no plan without one)")
        sub.add_argument("--json", action="store_true", help="print one JSON object")
        sub.add_argument("--weights", default="fp16", help="the dtype the model is loaded in: fp16, bf16, fp32")
        sub.add_argument("--attention", default="flash",
                         help="flash (flash or memory-efficient SDPA, the WebUI's sdp) or math (sdp-no-mem)")
        sub.add_argument("--residency", default="full", help="full, or medvram (also for --lowvram)")
        sub.add_argument("--processes", type=int, default=1, help="data-parallel processes sharing each batch")
        taken: set[str] = set()
        add_settings_flags(sub, "method", spec.config_type, taken)
        for section, config_type in setting_types.items():
            add_settings_flags(sub, section, config_type, taken)


def run(args: argparse.Namespace, settings: dict[str, dict[str, Any]]) -> int:
    """Measure, plan, print; FinetuneErrors go to the CLI's one error path."""

    request = Request(args.method, args.model, settings, Hardware(args.attention, args.residency, args.processes),
                      args.weights)
    out = report(request, args.fit)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    by = ", ".join(f"{name} {gib(n)}" for name, n in out["by_category"].items() if n)
    print(f"{args.method} on {args.model}: peak {gib(out['peak_bytes'])} ({by})")
    if "plan" not in out:
        print("no plan: pass --fit SIZE (like --fit 8GB), or run on a CUDA machine to plan for its free memory")
    elif not out["plan"]:
        print(f"fits {gib(out['target_bytes'])} (the card less {gib(CARD_RESERVE)} for CUDA itself) as it is")
    else:
        print(f"to fit {gib(out['target_bytes'])} (the card less {gib(CARD_RESERVE)} for CUDA itself):")
        for change in out["plan"]:
            flags = " ".join(change["flags"]) or "(no flag)"
            print(f"  {change['change']:<40} {flags:<36} -> {gib(change['peak_bytes'])}  {change['note']}")
        print(f"flags: {' '.join(out['plan_flags'])}")
    return 0
