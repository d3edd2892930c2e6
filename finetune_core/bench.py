"""`python -m finetune_core bench`: steps per second, peak resident memory and the compute floor, per method and model.

The compute floor of a step is its FLOPs (counted by `torch.utils.flop_counter.FlopCounterMode` over one loss and
backward) divided by the dense matrix-multiply rate measured on this machine in the same run; the achieved fraction
is that floor over the measured step time. Each case runs in its own process so peak memory is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

FULL_SD15 = "sd15-full"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "dataset"


@dataclass(frozen=True)
class CaseResult:
    """One (model, method) measurement."""

    model: str
    method: str
    resolution: int
    steps_per_second: float
    peak_rss_mib: float
    step_gflop: float
    matmul_gflops: float

    @property
    def floor_seconds(self) -> float:
        return self.step_gflop / self.matmul_gflops

    @property
    def achieved_fraction(self) -> float:
        return self.floor_seconds * self.steps_per_second


def matmul_rate(size: int = 1024, repeats: int = 10) -> float:
    """Best observed float32 matrix-multiply rate in GFLOP/s (2·n³ FLOPs per product)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _load(model_name: str):
    if model_name == FULL_SD15:
        from finetune_core.model.full_size import full_size_random
        return full_size_random("sd1")
    from finetune_core.model.loading import load_model
    return load_model(model_name)


def _step_flops(model, method_key: str, resolution: int, data_dir: Path) -> float:
    """FLOPs of one loss evaluation and its backward pass, with a batch as the loop would build it."""
    from torch.utils.flop_counter import FlopCounterMode

    from finetune_core import service
    from finetune_core.data.config import DatasetConfig
    from finetune_core.data.dataset import ImageDataset
    from finetune_core.train import objective
    from finetune_core.train.batch import TrainBatch
    spec = service.method_spec(method_key)
    data = ImageDataset(DatasetConfig(data_dir=str(data_dir), width=resolution, height=resolution,
                                      template="style.txt"), placeholder="bench")
    data.prepare(model)
    method = spec.build(model, "bench", spec.config_type(), Path(tempfile.mkdtemp()), 0)
    raw = data.get_batch(0, 0)
    latents = raw.latents.to(model.device)
    noise = torch.randn_like(latents)
    timesteps = torch.full((latents.shape[0],), 500, dtype=torch.long, device=model.device)
    alphas = model.alphas_cumprod().to(model.device)
    batch = TrainBatch(raw, latents, noise, timesteps, objective.add_noise(latents, noise, timesteps, alphas),
                       objective.training_target(model.prediction_type, latents, noise, timesteps, alphas), alphas,
                       raw.size_cond.to(model.device))
    with FlopCounterMode(display=False) as counter:
        method.loss(model, batch).backward()
    return float(counter.get_total_flops())


def run_case(model_name: str, method_key: str, steps: int) -> CaseResult:
    """Measure one case in this process."""
    import resource

    from finetune_core import service
    from finetune_core.train.events import StepEvent
    resolution = 256 if model_name == FULL_SD15 else 64
    model = _load(model_name)
    flops = _step_flops(model, method_key, resolution, EXAMPLES)
    times: list[float] = []

    def record(event: object) -> None:
        if isinstance(event, StepEvent):
            times.append(time.perf_counter())
    with tempfile.TemporaryDirectory() as out:
        request = service.TrainRequest(method_key, "bench", {}, {"data_dir": str(EXAMPLES), "width": resolution,
                                                                  "height": resolution, "template": "style.txt"},
                                       {"steps": steps + 1, "preview_every": 0, "save_every": 0})
        service.train(request, model, service.OutputFolders.standalone(out), on_event=record)
    per_step = (times[-1] - times[0]) / max(len(times) - 1, 1)  # the first step is warm-up
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return CaseResult(model_name, method_key, resolution, 1 / per_step, peak, flops / 1e9, matmul_rate())


def run_bench(models: list[str], methods: list[str], steps: int = 5, full: bool = False) -> list[CaseResult]:
    """Run every case in a child process and print one table."""
    cases = [(m, k) for m in models + ([FULL_SD15] if full else []) for k in methods]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, matmul "
          f"{matmul_rate():.1f} GFLOP/s (float32 1024x1024)")
    print(f"{'model':<10} {'method':<18} {'res':>4} {'steps/s':>8} {'peak RSS MiB':>12} {'GFLOP/step':>11} "
          f"{'floor s':>8} {'achieved':>9}")
    results = []
    for model_name, method_key in cases:
        code = ("import sys, json; from finetune_core.bench import run_case; "
                "r = run_case(sys.argv[1], sys.argv[2], int(sys.argv[3])); print(json.dumps(r.__dict__))")
        command = [sys.executable, "-c", code, model_name, method_key, str(steps)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{model_name:<10} {method_key:<18} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        result = CaseResult(**json.loads(done.stdout.strip().splitlines()[-1]))
        results.append(result)
        print(f"{result.model:<10} {result.method:<18} {result.resolution:>4} {result.steps_per_second:>8.2f} "
              f"{result.peak_rss_mib:>12.0f} {result.step_gflop:>11.2f} {result.floor_seconds:>8.4f} "
              f"{result.achieved_fraction:>8.1%}")
    return results
