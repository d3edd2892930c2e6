"""A process of a 2-process data-parallel test run (started by torch.multiprocessing with the environment
`accelerate launch` sets): joins the process group through the CLI's own path and runs a list of training jobs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from finetune_core.jobs import service
from finetune_core.model.tiny import build_tiny
from finetune_core.train import distributed
from finetune_core.train.control import Control
from finetune_core.train.distributed import Processes, join_processes
from finetune_core.train.events import StepEvent


def request_of(job: dict[str, Any], resume_run: str | None = None) -> service.TrainRequest:
    """A training request from a job description (method, name, method/data/train settings)."""
    return service.TrainRequest(job["method"], job["name"], job.get("method_settings", {}), job["data"],
                                job["train"], overwrite=True, resume_run=resume_run)


def run_job(job: dict[str, Any], folders: service.OutputFolders, processes: Processes,
            runs: dict[str, str]) -> dict[str, Any]:
    """Run one job on a fresh tiny model; `interrupt_at`: the main process presses Interrupt after that step."""
    control = Control()
    stop_at = job.get("interrupt_at")

    def on_event(event: Any) -> None:
        if stop_at is not None and isinstance(event, StepEvent) and event.step == stop_at:
            control.interrupt()
    resume = runs.get(job["resume"]) if job.get("resume") else None
    result = service.train(request_of(job, resume), build_tiny("tiny-sd1"), folders, on_event=on_event,
                           control=control, processes=processes)
    return {"artifacts": [str(p) for p in result.artifacts], "run_dir": str(result.run_dir), "step": result.step,
            "interrupted": result.interrupted}


def worker(rank: int, world: int, port: int, jobs: list[dict[str, Any]], out: str) -> None:
    """The body of process `rank`: the environment a launcher sets, one thread, the jobs; rank 0 reports."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    # small gradient buckets, so LoRA's gradients span many and the in-order overlapped starts are exercised
    distributed.GRADIENT_BUCKET = 2048
    processes = join_processes("cpu")
    folders = service.OutputFolders.standalone(Path(out))
    results: dict[str, Any] = {}
    runs: dict[str, str] = {}
    for job in jobs:
        before = getattr(processes, "overlapped_buckets", 0)
        results[job["key"]] = run_job(job, folders, processes, runs)
        results[job["key"]]["overlapped"] = getattr(processes, "overlapped_buckets", 0) - before
        runs[job["key"]] = results[job["key"]]["run_dir"]
    if processes.is_main:
        (Path(out) / "results.json").write_text(json.dumps(results), encoding="utf-8")
