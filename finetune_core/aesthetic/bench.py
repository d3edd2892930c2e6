"""`python -m finetune_core aesthetic bench`: what Aesthetic Gradients adds to computing a prompt's conditioning.

Per model: plain conditioning (a prompt and an empty negative prompt, no hook), the first call with an embedding
(the optimisation runs), and the repeated call (the personalised rows come from the cache), timed in alternating
rounds so all three see the same machine; wall clock and CPU time, medians over the rounds, and the memory the
optimisation holds (float32 masters, their gradients and Adam's two moments, for the weights it tunes).
`--full` adds the full-size SD1.5 text encoder (random weights; the UNet and VAE stay tiny, they take no part).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from finetune_core.aesthetic.personalized_text import (
    AestheticTarget,
    ConditioningCache,
    Personalization,
    PersonalizedText,
)
from finetune_core.bench.runner import busy_seconds, own_seconds
from finetune_core.model.configs import load_config
from finetune_core.model.diffusers_backend import DiffusersModel
from finetune_core.model.interface import ModelIdentity
from finetune_core.model.single_file import build_component
from finetune_core.model.tiny import randomize_weights

PROMPT = "a photo of a lighthouse on a cliff at dusk, dramatic sky, highly detailed, oil painting"
TINY = ("tiny-sd1", "tiny-sd2", "tiny-sdxl")
FULL = "sd15-text-full"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(TINY), help=f"comma-separated: {', '.join(TINY)}, {FULL}")
    parser.add_argument("--full", action="store_true", help=f"add {FULL} (the full-size SD1.5 text encoder)")
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds (plain / cached alternate)")
    parser.add_argument("--first", type=int, default=2, help="first calls timed per model (each with an empty cache)")
    parser.add_argument("--aesthetic-steps", type=int, default=5, help="optimisation steps (the default is 5)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")


@dataclass
class Row:
    """One model's figures (seconds are medians)."""

    model: str
    plain: tuple[float, float]  # (wall, CPU)
    first: tuple[float, float]
    cached: tuple[float, float]
    hook_ms: float  # time spent inside the hook per cached call (the overhead itself, steady on a busy machine)
    tuned_params: int
    held_mib: float
    peak_mib: float | None
    others: float | None = None  # share of all CPUs other processes used while this model was measured


def run_bench(args: argparse.Namespace) -> list[Row]:
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if args.full and FULL not in names:
        names.append(FULL)

    rows = []
    for name in names:
        model = build_model(name, args.device)
        busy, own, wall = busy_seconds(), own_seconds(), time.perf_counter()
        rows.append(measure(name, model, args.rounds, args.first, args.aesthetic_steps))
        rows[-1].others = _others_share(busy, own, time.perf_counter() - wall)
        print(format_row(rows[-1]), flush=True)
    print(format_table(rows))
    return rows


def build_model(name: str, device: str) -> Any:
    """A built-in tiny model, or the tiny SD1 model with the full-size SD1.5 text encoder (random weights)."""
    from finetune_core.model.tiny import build_tiny, tiny_components

    if name != FULL:
        return build_tiny(name, device=device)

    parts = tiny_components("tiny-sd1")
    with torch.device("meta"):
        encoder = build_component("text_encoder", load_config("sd1", "text_encoder"))
    encoder = encoder.to_empty(device="cpu")
    randomize_weights(encoder, torch.Generator().manual_seed(15))
    return DiffusersModel(parts.unet, parts.vae, encoder, family="sd1", prediction_type="epsilon",
                          identity=ModelIdentity(FULL, "00000000f1"), device=device)


def measure(name: str, model: Any, rounds: int, firsts: int, steps: int) -> Row:
    width = model.text_encoders[-1].width
    generator = torch.Generator().manual_seed(0)
    target = AestheticTarget.of("bench", torch.randn(1, width, generator=generator),
                                torch.randn(width, width, generator=generator) * width ** -0.5)
    options = Personalization(steps=steps)

    def encode(hook: Any = None) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                if hook is None:
                    return model.encode_prompts([PROMPT, ""])
                with model.text_chunk_hook(hook):
                    return model.encode_prompts([PROMPT, ""])
        return call

    encode()()  # warm up (allocator, kernels)
    first, peak = [], None
    for _ in range(firsts):
        _reset_peak(model.device)
        first.append(_timed(encode(PersonalizedText(target, options, ConditioningCache()))))
        peak = _peak_mib(model.device)
    cached_hook = _Stopwatch(PersonalizedText(target, options, ConditioningCache()))
    encode(cached_hook)()
    cached_hook.seconds.clear()
    plain: list[tuple[float, float]] = []
    cached: list[tuple[float, float]] = []
    for i in range(rounds):
        pair = [(plain, encode()), (cached, encode(cached_hook))]
        for out, call in pair if i % 2 == 0 else reversed(pair):
            out.append(_timed(call))
    tuned = _tuned_params(model, width)
    hook_ms = 1000 * sum(cached_hook.seconds) / rounds
    return Row(name, _median(plain), _median(first), _median(cached), hook_ms, tuned, tuned * 16 / 2 ** 20, peak)


class _Stopwatch:
    """A chunk hook that times the hook it wraps (summed over the encoders of a call)."""

    def __init__(self, hook: Callable[[Any], Any]) -> None:
        self.hook = hook
        self.seconds: list[float] = []

    def __call__(self, chunks: Any) -> Any:
        start = time.perf_counter()
        out = self.hook(chunks)
        self.seconds.append(time.perf_counter() - start)
        return out


def _others_share(busy_before: float | None, own_before: float, wall: float) -> float | None:
    """The share of all CPUs that other processes used during `wall` seconds (Linux), as the bench runner notes it:
    on a shared machine it says how far the figures can be trusted."""
    busy = busy_seconds()
    if busy is None or busy_before is None or wall <= 0:
        return None
    theirs = (busy - busy_before) - (own_seconds() - own_before)
    return max(0.0, theirs) / (wall * (os.cpu_count() or 1))


def _timed(call: Callable[[], Any]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def _median(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def _tuned_params(model: Any, width: int) -> int:
    """Weights the optimisation keeps masters of: the encoder's, less its projection and its token table (of
    which only the prompt's rows, a few dozen, are tuned)."""
    index = next(i for i, spec in enumerate(model.text_encoders) if spec.width == width)
    encoder = list(model.trainable_modules().values())[1 + index]
    table = encoder.get_input_embeddings().weight
    return sum(p.numel() for name, p in encoder.named_parameters()
               if p is not table and "projection" not in name) + 77 * width


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def format_row(row: Row) -> str:
    return (f"{row.model}: plain {row.plain[0] * 1000:.1f} ms, first {row.first[0]:.2f} s "
            f"({row.first[0] / row.plain[0]:.0f}x), cached {row.cached[0] * 1000:.1f} ms "
            f"({row.cached[0] / row.plain[0]:.3f}x wall, {row.cached[1] / row.plain[1]:.3f}x CPU), "
            f"in the hook {row.hook_ms:.2f} ms ({row.hook_ms / 10 / row.plain[0]:.2f}% of plain), "
            f"others {_share(row.others)}")


def _share(others: float | None) -> str:
    return "-" if others is None else f"{others:.0%}"


def format_table(rows: list[Row]) -> str:
    lines = ["| model | plain | first call | first / plain | cached | cached / plain (wall, CPU) "
             "| in the hook, cached | tuned weights | masters + Adam | others |", "|---" * 10 + "|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.plain[0] * 1000:.1f} ms | {r.first[0]:.2f} s | {r.first[0] / r.plain[0]:.0f}x "
                     f"| {r.cached[0] * 1000:.1f} ms | {r.cached[0] / r.plain[0]:.3f}, {r.cached[1] / r.plain[1]:.3f} "
                     f"| {r.hook_ms:.2f} ms ({r.hook_ms / 10 / r.plain[0]:.2f}%) | {r.tuned_params / 1e6:.1f} M "
                     f"| {r.held_mib:.0f} MiB | {_share(r.others)} |")
    return "\n".join(lines)
