"""`make gpu-proof`: the no-GPU measurement against a real GPU. Full-size random SD1.5 (512) and SDXL (1024) built
on the device; every method a few steps at its defaults and at the 8 GB plan; per row the real peak
(`torch.cuda.max_memory_allocated` and reserved), the measured-without-GPU peak, their ratio, s/step and images/s.

On a CPU it runs the same code path with the tiny models (`--models tiny-sd1`), the real peak then being the
tracker's count of the real steps; tests run it so that it never rots.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

SIDES = {"sd15-full": 512, "sd2-full": 768, "sdxl-full": 1024, "tiny-sd1": 64, "tiny-sd2": 64, "tiny-sdxl": 64}


@dataclass
class Row:
    model: str
    method: str
    settings: str  # "defaults" / "8GB plan"
    measured_bytes: int
    real_allocated: int
    real_reserved: int
    ratio: float
    seconds_per_step: float
    images_per_second: float
    note: str = ""


def build_real(name: str, dtype: torch.dtype, device: torch.device) -> Any:
    """Architecture `name` with random weights, built directly on `device` (a full-size model never passes through
    the CPU in float32)."""
    from finetune_core.model.configs import available_components, load_config
    from finetune_core.model.diffusers_backend import DiffusersModel
    from finetune_core.model.full_size import FULL_SIZE
    from finetune_core.model.interface import ModelIdentity
    from finetune_core.model.single_file import build_component
    from finetune_core.model.tiny import build_tiny

    if name not in FULL_SIZE:
        return build_tiny(name, device=device, dtype=dtype)
    family = FULL_SIZE[name]
    names = [n for n in ("unet", "vae", "text_encoder", "text_encoder_2") if n in available_components(family)]
    with torch.device("meta"):
        modules = {n: build_component(n, load_config(family, n)) for n in names}
    generator = torch.Generator(device).manual_seed(0)
    for module in modules.values():
        module.to_empty(device=device)
        with torch.no_grad():
            for p in [*module.parameters(), *module.buffers()]:
                if p.is_floating_point():
                    p.normal_(0.0, 0.02, generator=generator)
                else:
                    p.copy_(torch.arange(p.shape[-1], device=device).expand_as(p))  # position ids
        module.to(dtype)
    prediction = load_config(family, "scheduler").get("prediction_type", "epsilon")
    return DiffusersModel(modules["unet"], modules["vae"], modules["text_encoder"], modules.get("text_encoder_2"),
                          family=family, prediction_type=prediction, identity=ModelIdentity(name, "0" * 10),
                          device=device, dtype=dtype)


def real_run(request: Any, device: torch.device, steps: int) -> tuple[int, int, float]:
    """(peak allocated, peak reserved, seconds per step after the first) of `steps` real steps of the request; on a
    CPU the allocated peak is the tracker's count of the real steps and reserved equals it."""
    from finetune_core.jobs.fit import run_steps
    from finetune_core.train.memory import real_device

    cuda = device.type == "cuda"
    times: list[float] = []

    def tick(_step: int) -> None:
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter())

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    def build(dtype: torch.dtype) -> Any:
        model = build_real(request.model, dtype, device)
        if request.hardware.residency == "medvram" and request.method != "dreamartist":
            model.vae.to("cpu")  # what medvram keeps off the device that this backend can (the steps never use it)
        return model

    start = time.perf_counter()
    counted = run_steps(request, real_device(track=not cuda), build, steps, tick)
    per_step = (times[-1] - times[0]) / max(1, len(times) - 1) if len(times) > 1 else time.perf_counter() - start
    if cuda:
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device), per_step
    return counted.peak_bytes, counted.peak_bytes, per_step


def proof_rows(models: Sequence[str], methods: Sequence[str], device: torch.device, steps: int,
               fit: str) -> list[Row]:
    """Every (model, method) at its defaults and at the plan for `fit`, each measured without the GPU and run."""
    from finetune_core.errors import FinetuneError
    from finetune_core.jobs.fit import CARD_RESERVE, Request, measure, parse_size, plan_fit

    rows = []
    for model in models:
        side = SIDES[model]
        for method in methods:
            request = Request(method, model, {"data": {"width": side, "height": side}})
            measured = measure(request)
            cases = [("defaults", request, measured, "")]
            try:
                plan = plan_fit(request, parse_size(fit) - CARD_RESERVE, measured)
                if plan.changes:
                    cases.append((f"{fit} plan", plan.request, plan.final, " ".join(plan.flags())))
            except FinetuneError as exc:
                cases.append((f"{fit} plan", request, measured, f"no plan: {exc}"))
            for label, case, expected, note in cases:
                rows.append(_row(model, method, label, case, expected.peak_bytes, device, steps, note))
                print(_format(rows[-1]), flush=True)
    return rows


def _row(model: str, method: str, label: str, request: Any, expected: int, device: torch.device, steps: int,
         note: str) -> Row:
    from finetune_core.jobs.fit import configs_for

    batch = configs_for(request)["data"].batch_size
    try:
        allocated, reserved, per_step = real_run(request, device, steps)
    except torch.cuda.OutOfMemoryError as exc:  # a row that does not fit this GPU says so; the others still run
        return Row(model, method, label, expected, 0, 0, 0.0, 0.0, 0.0, f"out of memory: {str(exc)[:80]}")
    return Row(model, method, label, expected, allocated, reserved, allocated / expected if expected else 0.0,
               per_step, batch / per_step if per_step else 0.0, note)


def _format(row: Row) -> str:
    gib = 1024 ** 3
    return (f"{row.model:<10} {row.method:<18} {row.settings:<9} measured {row.measured_bytes / gib:6.2f} GiB  "
            f"real {row.real_allocated / gib:6.2f} GiB (reserved {row.real_reserved / gib:6.2f})  "
            f"ratio {row.ratio:5.2f}  {row.seconds_per_step:7.3f} s/step  {row.images_per_second:6.2f} img/s  "
            f"{row.note}")


def main(argv: Sequence[str] | None = None) -> int:
    from finetune_core.methods import METHODS

    parser = argparse.ArgumentParser(prog="python -m finetune_core.bench.gpu_proof",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="sd15-full,sdxl-full", help=f"from {', '.join(SIDES)}")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--fit", default="8GB")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    rows = proof_rows(args.models.split(","), args.methods.split(","), device, args.steps, args.fit)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump([asdict(r) for r in rows], out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
