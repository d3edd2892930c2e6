"""Peak device memory of training, measured: two real training steps (`train.step.train_step`: forward, backward,
optimizer step; the second is the steady state) of the method on the model, counted op by op by
`train.memory_tracker.LiveBytes`.

On fake tensors (`FakeTensorMode`: shapes and dtypes, no data and no memory) this measures a full-size model on any
machine in seconds. It counts what CUDA would allocate, not what the CPU path does:
- the model's weights in the dtype a GPU user loads them in, and autocast's cache of the trained weights' casts;
- attention through `scaled_dot_product_attention` with the kernel CUDA would pick: "flash" (flash or
  memory-efficient attention: memory linear in tokens; the CPU's flash kernel keeps the same tensors) or "math"
  (the attention matrix, quadratic in tokens: `--opt-sdp-no-mem-attention`, or torch without fused kernels);
- the optimizer as CUDA runs it: torch's foreach implementation (one temporary the size of the state), 8-bit
  AdamW's one-byte moments with a float32 scale per 256 values (bitsandbytes' blockwise states; tensors under
  4096 values keep float32 states, as bitsandbytes does);
- tensors that live in host memory on a GPU machine are off the count: the text cache, frozen originals a
  session sets aside, EMA kept on the CPU, and under `medvram` the modules a step does not use.
A GradScaler adds no device memory worth counting (it unscales gradients in place); the fake steps run without it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from finetune_core.data.cache import TextCache
from finetune_core.data.data_batch import DataBatch
from finetune_core.data.summary import DatasetSummary
from finetune_core.errors import ConfigError
from finetune_core.model.interface import DiffusionModel, TrainingSetup
from finetune_core.train import optim
from finetune_core.train.ema import ParameterAverages
from finetune_core.train.memory_tracker import LiveBytes, module_tensors, rounded
from finetune_core.train.step import StepContext, make_grad_scaler, train_step
from finetune_core.train.train_config import TrainConfig

GIB = 1024 ** 3
ATTENTION = ("flash", "math")
RESIDENCY = ("full", "medvram")  # lowvram trains like medvram: the hooks are off and a step's modules resident
BLOCKWISE = 256  # bitsandbytes' block of values per 8-bit state scale
MIN_8BIT_SIZE = 4096  # bitsandbytes keeps float32 states for smaller tensors


@dataclass(frozen=True)
class MemoryNeeds:
    """What a method's files need on disk (`MethodSpec.memory`): the values it trains and one artefact's size.

    trainable: values it trains (the resume state keeps them with two Adam moments).
    artifact_bytes: size of one artefact file (0: the trainable values in float32).
    """

    trainable: int
    artifact_bytes: int = 0

    @property
    def file_bytes(self) -> int:
        """Bytes one artefact file takes on disk."""
        return self.artifact_bytes or 4 * self.trainable


@dataclass(frozen=True)
class Hardware:
    """How the steps run on the GPU: the attention kernel, which modules stay on the device, processes sharing
    a batch (each process holds the whole model and its share of the batch)."""

    attention: str = "flash"
    residency: str = "full"
    processes: int = 1

    def problems(self) -> list[str]:
        out = []
        if self.attention not in ATTENTION:
            out.append(f"attention {self.attention!r} is not one of {', '.join(ATTENTION)}")
        if self.residency not in RESIDENCY:
            out.append(f"residency {self.residency!r} is not one of {', '.join(RESIDENCY)} (lowvram trains as "
                       f"medvram)")
        if self.processes < 1:
            out.append(f"processes {self.processes} must be 1 or more")
        return out


@dataclass(frozen=True)
class Trace:
    """What the steps' peak is made of, kept to compute the same steps with another optimizer state
    (`with_8bit_adamw`): per step (0, 1, ...) its segments, "pre" (to the optimizer step), "opt" (the optimizer
    step: its value and totals are those on entering it) and "post", each with its largest live bytes less the
    optimizer state and the totals at that moment; the size of each tensor given optimizer state; the optimizer."""

    segments: tuple[tuple[int, str, int, tuple[tuple[str, int], ...]], ...]
    state_numels: tuple[int, ...]
    optimizer: str
    steps: int
    hostable: tuple[tuple[str, int], ...] | None = None  # what medvram would leave in RAM, by category


@dataclass(frozen=True)
class Measurement:
    """The peak bytes of the steps and what was live at that moment, by category (`trace`: how it was reached,
    when the steps were measured)."""

    peak_bytes: int
    by_category: dict[str, int]
    trace: Trace | None = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        parts = ", ".join(f"{name} {gib(n)}" for name, n in self.by_category.items() if n)
        return f"peak {gib(self.peak_bytes)} ({parts})"

    @property
    def dominant(self) -> str:
        return max(self.by_category, key=lambda name: self.by_category[name])


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def model_parameters(model: DiffusionModel) -> int:
    """Number of weights in the model's modules (UNet, text encoders, and the VAE when the backend exposes it)."""
    modules = list(model.trainable_modules().values())
    vae = getattr(model, "vae", None)
    if isinstance(vae, torch.nn.Module):
        modules.append(vae)
    seen: set[int] = set()
    total = 0
    for module in modules:
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
    return total


def hypernetwork_parameters(widths: set[int], layers: tuple[float, ...]) -> int:
    """Weights of a WebUI hypernetwork: per context width, a k and a v MLP with layer sizes width × `layers`."""
    total = 0
    for width in widths:
        sizes = [int(width * m) for m in layers]
        per_mlp = sum(a * b + b for a, b in itertools.pairwise(sizes))
        total += 2 * per_mlp
    return total


def free_device_memory(device: torch.device | str) -> int | None:
    """Free memory of a CUDA device (what a run can still take); None for other devices."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None


# --- the data of the measured steps ---------------------------------------------------------------------------------
@dataclass
class ShapeData:
    """Batches of the run's shapes with random values (the values do not change the memory a step takes).

    paired: prior preservation's batches (as many class samples as instance samples in one UNet pass).
    keep_pixels: the images beside the latents (DreamArtist's reconstruction loss).
    """

    batch_size: int
    width: int
    height: int
    prompt: str
    latent_channels: int = 4
    vae_scale: int = 8
    paired: bool = False
    keep_pixels: bool = False

    def prepare(self, model: DiffusionModel, on_progress: Any = None) -> None:
        return None

    def batches_per_epoch(self) -> int:
        return 1

    def summary(self) -> DatasetSummary:
        return DatasetSummary({}, {}, {}, (self.width, self.height))

    def get_batch(self, index: int, seed: int) -> DataBatch:
        n = self.batch_size * (2 if self.paired else 1)
        h, w = self.height // self.vae_scale, self.width // self.vae_scale
        size = torch.tensor([[self.height, self.width, 0, 0, self.height, self.width]] * n, dtype=torch.float32)
        pixels = torch.randn(n, 3, self.height, self.width) if self.keep_pixels else None
        extras: dict[str, Any] = {"is_class": [False] * self.batch_size + [True] * self.batch_size} \
            if self.paired else {}
        return DataBatch(torch.randn(n, self.latent_channels, h, w), [self.prompt] * n, size, pixels=pixels,
                         extras=extras)


# --- 8-bit AdamW's states, as bitsandbytes keeps them ---------------------------------------------------------------
class BlockwiseAdamState(torch.optim.Optimizer):
    """AdamW with bitsandbytes' 8-bit blockwise state layout (two uint8 moments and a float32 scale per 256 values;
    float32 moments for tensors under 4096 values). It steps like AdamW without dequantizing: the measurement needs
    its sizes, and bitsandbytes' fused CUDA kernel makes no full-size temporaries."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, **defaults: Any) -> None:
        super().__init__(params, {"lr": lr, **defaults})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    if p.numel() < MIN_8BIT_SIZE:
                        state["state1"] = torch.zeros_like(p, dtype=torch.float32)
                        state["state2"] = torch.zeros_like(p, dtype=torch.float32)
                    else:
                        blocks = math.ceil(p.numel() / BLOCKWISE)
                        state["state1"] = torch.zeros_like(p, dtype=torch.uint8)
                        state["state2"] = torch.zeros_like(p, dtype=torch.uint8)
                        state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                        state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                state["step"] += 1
                p.add_(p.grad, alpha=-group["lr"])


# --- the measured steps ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def fake_device(mode: Any = None) -> Iterator[LiveBytes]:
    """Fake tensors with the tracker on top: build the model and the method inside, then `measure_steps`. `mode`:
    the `FakeTensorMode` to enter (one that made a model built before: its fake tensors belong to it), else a new
    one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    tracker = LiveBytes(scalar=1.0)
    mode = mode or FakeTensorMode(allow_non_fake_inputs=True)
    with mode, _swaps_by_data(), tracker:
        yield tracker


@contextlib.contextmanager
def real_device(track: bool = True) -> Iterator[LiveBytes]:
    """The same tracker over real tensors (tests compare it with the fake measurement); `track=False` leaves it
    off (a GPU counts its own peak, without the tracker's cost per operator)."""
    tracker = LiveBytes()
    with tracker if track else contextlib.nullcontext():
        yield tracker


@contextlib.contextmanager
def _swaps_by_data() -> Iterator[None]:
    """`Module.to` swaps a fake parameter for its converted copy, and the swap fails when fake-tensor bookkeeping holds
    a weak reference to it; meanwhile such a swap sets the parameter's data instead (what it does for real
    tensors). Undone on exit."""
    import torch.utils

    swap = torch.utils.swap_tensors

    def swap_or_set(t1: torch.Tensor, t2: torch.Tensor) -> None:
        try:
            swap(t1, t2)
        except RuntimeError:
            t1.data = t2.data  # Module._apply keeps t1, which now holds the converted value

    torch.utils.swap_tensors = swap_or_set  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.utils.swap_tensors = swap


def measure_steps(tracker: LiveBytes, model: DiffusionModel, method: Any, data: ShapeData, config: TrainConfig,
                  hardware: Hardware, steps: int = 2, after_step: Any = None) -> Measurement:
    """Run `steps` steps of `method` on `model` under the run's settings and return the peak the tracker saw
    (`after_step(i)` after each: the GPU proof times them)."""
    problems = hardware.problems()
    if problems:
        raise ConfigError(problems)
    modules = [*model.trainable_modules().values(), *([model.vae] if hasattr(model, "vae") else [])]
    before = module_tensors(modules)
    tracker.file_as(before, "weights")
    originals = {id(t.untyped_storage()) for t in before}  # a session may swap a parameter's data for a master
    setup = TrainingSetup(method.trains, config.precision, config.gradient_checkpointing,
                          vae_gradient_checkpointing=config.gradient_checkpointing and method.decodes_latents)
    known = set(tracker.live)
    hooks: list[Any] = []  # taken off after the steps: the model's own parameters may carry them (DreamBooth)
    with model.training_session(setup) as session, _removed(hooks):
        resident = module_tensors(modules)
        tracker.file_as(resident, "weights")
        kept = {id(t.untyped_storage()) for t in resident}
        # what the session set aside (the trained modules' original values) goes to RAM on a GPU machine
        tracker.host_keys([key for key in originals if key not in kept])
        tracker.host_keys([key for key in tracker.live if key not in known and key not in kept])
        unused = module_tensors(_unused_modules(model, method))
        hostable = None if hardware.residency == "medvram" else tuple(tracker.bytes_of(unused).items())
        if hardware.residency == "medvram":
            tracker.host(unused)
        with model.placement(), method.training_context(model), attention_kernel(hardware.attention):
            ctx = _context(tracker, model, method, data, config, session, hooks)
            tracker.reset_peak()
            first = Measurement(0, {})
            for step in range(steps):
                if step == 1:  # the steady state from here: the optimizer state exists and is filed as such
                    first = Measurement(tracker.peak, dict(tracker.peak_by_category))
                    tracker.reset_peak()
                tracker.step = step
                tracker.begin_segment(f"{step}:pre")
                _measured_step(tracker, ctx, step)
                if after_step is not None:
                    after_step(step)
            tracker.end_segments()
    trace = Trace(tuple((int(name.split(":")[0]), name.split(":")[1], value, tuple(totals.items()))
                        for name, (value, totals) in tracker.segments),
                  tuple(p.numel() for p in ctx.optimizer.state), config.optimizer, steps, hostable)
    return _composed(first.peak_bytes, tracker.peak, dict(tracker.peak_by_category), trace)


def _composed(first_peak: int, steady_peak: int, steady: dict[str, int], trace: Trace | None) -> Measurement:
    """The measurement of the first step's peak and the steady steps' peak with its totals."""
    steady = dict(steady)
    # the breakdown is the steady step's (the first files the optimizer state it creates as temporaries); where the
    # first step went higher (by what it made once: the state, the text cache), the excess counts as temporaries
    steady["temporaries"] += max(0, first_peak - steady_peak)
    return Measurement(max(first_peak, steady_peak), steady, trace)


def eight_bit_state_bytes(numel: int) -> int:
    """Device bytes of one tensor's `BlockwiseAdamState` state, as the tracker counts them (512-byte blocks)."""
    if numel < MIN_8BIT_SIZE:
        moments = 2 * rounded(4 * numel)
    else:
        moments = 2 * rounded(numel) + 2 * rounded(4 * math.ceil(numel / BLOCKWISE))
    return rounded(4) + moments  # the step count: a float32 scalar


def with_8bit_adamw(measured: Measurement) -> Measurement | None:
    """The measurement of the same steps with 8-bit AdamW (`BlockwiseAdamState`) in place of the measured torch
    AdamW or Adam, computed from `measured.trace` without running them again (equal to measuring them: tested);
    None when it cannot be (no trace, another optimizer).

    The optimizer state is the only thing the optimizer changes outside its own step, and it is constant outside
    it: every segment before or after an optimizer step keeps its moments, less the old state plus the new one.
    8-bit AdamW's own step makes its state in the first step and nothing else: that segment peaks at its entry
    plus the new state (filed as temporaries while it is made)."""

    trace = measured.trace
    if trace is None or trace.optimizer not in ("adamw", "adam"):
        return None
    state = sum(eight_bit_state_bytes(n) for n in trace.state_numels)
    first: tuple[int, dict[str, int]] = (0, {})
    steady: tuple[int, dict[str, int]] | None = None
    for step, kind, value, items in trace.segments:
        totals = dict(items)
        had_state = totals["optimizer"] > 0
        if kind == "opt" and not had_state:
            totals["temporaries"] += state
        else:
            totals["optimizer"] = state if had_state else 0
        value += state if kind == "opt" or had_state else 0
        if step == 0 and trace.steps > 1:
            if value > first[0]:
                first = (value, totals)
        elif steady is None or value > steady[0]:
            steady = (value, totals)
    if steady is None:
        return None
    return _composed(first[0], steady[0], steady[1],
                     Trace((), trace.state_numels, "adamw8bit", trace.steps, trace.hostable))


def with_medvram(measured: Measurement) -> Measurement | None:
    """The measurement of the same steps under medvram residency, computed from a measurement with everything
    resident (equal to measuring them: tested); None when it cannot be. The modules a step does not use are
    weights that live from before the first step to after the last, untouched: leaving them in RAM lowers every
    moment of the steps, the peak among them, by their bytes."""

    trace = measured.trace
    if trace is None or trace.hostable is None:
        return None
    hosted = dict(trace.hostable)
    return Measurement(measured.peak_bytes - sum(hosted.values()),
                       {name: n - hosted.get(name, 0) for name, n in measured.by_category.items()},
                       Trace((), trace.state_numels, trace.optimizer, trace.steps, None))


def _unused_modules(model: DiffusionModel, method: Any) -> list[torch.nn.Module]:
    """What a step does not touch: the VAE unless the loss decodes, the text encoders when their output is cached."""
    unused = [] if method.decodes_latents else [model.vae]  # type: ignore[attr-defined]
    if method.caches_text:
        unused += [m for name, m in model.trainable_modules().items() if name.startswith("text_encoder")]
    return unused


@contextlib.contextmanager
def attention_kernel(kernel: str) -> Iterator[None]:
    """SDPA as CUDA would run it: "flash" (flash or memory-efficient: linear in tokens) or "math" (quadratic)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # flash first; a masked attention (CLIP's causal mask) falls back to math on the CPU as CUDA falls back to
    # memory-efficient: at 77 tokens the two differ by kilobytes
    backends = [SDPBackend.MATH] if kernel == "math" else [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                           SDPBackend.MATH]
    with sdpa_kernel(backends):
        yield


@contextlib.contextmanager
def _removed(hooks: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _context(tracker: LiveBytes, model: DiffusionModel, method: Any, data: ShapeData, config: TrainConfig,
             session: Any, hooks: list[Any]) -> Any:

    groups = method.trainable_parameters(model)
    params = [p for g in groups for p in g.params]
    for p in params:
        p.requires_grad_(True)
        hooks.append(p.register_post_accumulate_grad_hook(lambda p: tracker.file_as([p.grad], "gradients")))
    tracker.file_as(params, "weights")
    optimizer = _optimizer(groups, config)
    optimizer.register_step_pre_hook(lambda *_: _before_optimizer(tracker))
    optimizer.register_step_post_hook(lambda *_: _after_optimizer(tracker, optimizer))
    averages = ParameterAverages(groups)
    tracker.file_as(averages.tensors(), "ema")
    tracker.host(averages.host_tensors())
    return StepContext(model, method, data, optimizer, make_grad_scaler(model.device, session.compute_dtype), params,
                       0, config.gradient_accumulation, session.autocast, config.min_snr_gamma, config.noise_offset,
                       config.clip_grad_mode, [(float(config.clip_grad_value), 0)] if config.clip_grad_mode !=
                       "disabled" else [], model.alphas_cumprod().float(),
                       TextCache() if method.caches_text else None, averages)


def _optimizer(groups: list[Any], config: TrainConfig) -> torch.optim.Optimizer:
    from dataclasses import replace


    if config.optimizer == "adamw8bit":  # bitsandbytes needs CUDA: its state layout, not its kernel
        optimizer: torch.optim.Optimizer = BlockwiseAdamState([{"params": list(g.params)} for g in groups], lr=1e-4)
        return optimizer
    optimizer = optim.build_optimizer(groups, replace(config, learning_rate="0.0001"), 1e-4)
    for group in optimizer.param_groups:
        if "foreach" in group:
            group["foreach"] = True  # CUDA's default: a full-size temporary per state tensor group
    return optimizer


def _before_optimizer(tracker: LiveBytes) -> None:
    tracker.phase = "temporaries"
    tracker.begin_segment(f"{tracker.step}:opt", moving=False)  # its entry: what the optimizer makes is its own


def _after_optimizer(tracker: LiveBytes, optimizer: torch.optim.Optimizer) -> None:
    tracker.file_as((t for state in optimizer.state.values() for t in state.values()
                     if isinstance(t, torch.Tensor)), "optimizer")
    tracker.phase = "activations"
    tracker.begin_segment(f"{tracker.step}:post")


def _measured_step(tracker: LiveBytes, ctx: Any, step: int) -> None:

    tracker.phase = "activations"
    train_step(ctx, step, step)
    if ctx.text_cache is not None:
        tracker.host(ctx.text_cache.tensors())
