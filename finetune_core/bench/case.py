"""One benchmark run in its own process: load the model, train a few steps through the service, time every step.

The run trains `1 + steps (+ 1)` steps: the first ends the time to first step, split into phases (imports, model
load, setup: the dataset scan, the method's preparation and the training context; latents: VAE encoding; text: text
encoding; step 1: the rest of the first step, its warm-up), the next `steps` are timed, and when FLOPs are asked for,
one more step runs under `FlopCounterMode`, so the count is that of a real step of the loop (not a re-built imitation
of one). An image is VAE-encoded the first time a step draws it, once per run: the timed steps' times, CPU times and
FLOPs leave that out (it is reported beside them), so they are what every step of a later epoch costs. The float32
matrix-multiply rate is measured right before and right after, under the run's own threads and device.
"""

from __future__ import annotations

import contextlib
import json
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULT_MARKER = "BENCH-RESULT "
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "dataset"
FULL_SD15 = "sd15-full"
TINY = ("tiny-sd1", "tiny-sd2", "tiny-sdxl")


@dataclass(frozen=True)
class RunSpec:
    """What one run measures (JSON on the child's command line)."""

    model: str
    method: str
    settings: dict[str, Any]  # RunSettings.to_dict()
    steps: int  # timed steps
    count_flops: bool = False
    profile_path: str | None = None


@dataclass
class RunResult:
    """What one run measured."""

    step_seconds: list[float]
    first_step_seconds: float  # process start (less the matmul probe) to the end of the first step
    phases: dict[str, float]  # import, load, setup, latents, text, step 1 (see the module's docstring)
    peak_rss_mib: float
    peak_device_mib: float | None  # CUDA only
    faults_per_step: float  # minor page faults per timed step
    cpu_seconds_per_step: float  # CPU time (user + system, all threads) per timed step: less sensitive to a busy
    # machine than the wall clock; above s/step x threads it shows threads spinning instead of working
    matmul_before: float
    matmul_after: float
    step_gflop: float | None
    threads: int
    device: str
    size: str  # "WxH"
    images_seconds: float = 0.0  # VAE-encoding images first drawn in the timed steps: left out of their times

    @property
    def seconds_per_step(self) -> float:
        return statistics.median(self.step_seconds)


def matmul_rate(device: Any = "cpu", size: int = 1024, repeats: int = 10) -> float:
    """Best observed float32 matrix-multiply rate in GFLOP/s (2·n³ FLOPs per product) on `device`."""
    import torch

    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def default_size(model: str) -> int:
    """64 px for the built-in tiny models, 256 px for full-size architectures and checkpoint files."""
    return 64 if model in TINY else 256


def _bool_words(config_type: type, values: dict[str, Any]) -> dict[str, Any]:
    """`true` / `false` (any case) as bools for the bool fields of `config_type`; anything else is left as it is."""
    from finetune_core.settings import field_kinds

    words = {"true": True, "false": False}
    kinds = field_kinds(config_type)
    return {name: words.get(value.strip().lower(), value) if isinstance(value, str) and name in kinds
            and kinds[name][0] == "bool" else value for name, value in values.items()}


def request_settings(spec_model: str, method: str, settings: dict[str, Any], steps: int) -> dict[str, dict]:
    """The method/data/train settings of a run: the bench's defaults under the run's overrides."""
    from finetune_core.data.dataset_config import DatasetConfig
    from finetune_core.methods import METHODS
    from finetune_core.settings import coerce_settings
    from finetune_core.train.train_config import TrainConfig

    size = default_size(spec_model)
    # `--set` / `--compare` values are command-line text: numbers are typed as the CLI types its flags, and a bool
    # field takes the words true / false (the bench's own `name=value` text; there is no --flag form here).
    sections = {name: coerce_settings(config_type, _bool_words(config_type, settings.get("sections", {}).get(name, {})),
                                      name, from_text=True)
                for name, config_type in (("method", METHODS[method].config_type), ("data", DatasetConfig),
                                          ("train", TrainConfig))}
    data = {"data_dir": str(EXAMPLES), "width": size, "height": size, "template": "style.txt", **sections["data"]}
    train = {"preview_every": 0, "save_every": 0, "csv_every": 0, **sections["train"], "steps": steps}
    return {"method": sections["method"], "data": data, "train": train}


_SWITCH = {"true": True, "on": True, "false": False, "off": False}


class EncoderClock:
    """The seconds a model spends in `encode_images` (latents) and `encode_prompts` (text) while entered.

    The loop's Phase events end where the first step begins, but a step encodes too (prompts always, images the
    first time a sample is drawn), so the bench times the two encoders themselves; on exit the model is as before.
    An image is encoded once per run, so the timed steps leave its time out (wall and CPU) and, while `counting`,
    its FLOPs (`image_flops`): they are what every later epoch costs.
    """

    NAMES = {"encode_images": "latents", "encode_prompts": "text"}

    def __init__(self, model: Any) -> None:
        self.model = model
        self.seconds = dict.fromkeys(self.NAMES.values(), 0.0)
        self.image_cpu_seconds = 0.0
        self.image_flops = 0.0
        self.counting = False

    def __enter__(self) -> EncoderClock:
        import torch
        sync = torch.cuda.synchronize if torch.device(self.model.device).type == "cuda" else (lambda: None)
        for attr, what in self.NAMES.items():
            setattr(self.model, attr, self._timed(getattr(self.model, attr), what, sync))
        return self

    def __exit__(self, *exc: object) -> None:
        for attr in self.NAMES:
            delattr(self.model, attr)  # the instance attribute goes: the class's method is found again

    def _timed(self, encode: Any, what: str, sync: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter(), time.process_time()
            image = what == "latents"
            try:
                # an inner counter sees the encoder's FLOPs, which the step's counter (outside it) sees too
                with flop_counter() if image and self.counting else contextlib.nullcontext() as inner:
                    result = encode(*args, **kwargs)
                sync()
                if inner is not None:
                    self.image_flops += float(inner.get_total_flops())
                return result
            finally:
                self.seconds[what] += time.perf_counter() - start
                if image:
                    self.image_cpu_seconds += time.process_time() - cpu
        return timed

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)


class _Recorder:
    """The loop's event sink: step times, page faults, and the profiler/FLOP counter around chosen steps."""

    def __init__(self, spec: RunSpec, clock: EncoderClock) -> None:
        self.spec = spec
        self.clock = clock
        self.started = 0.0
        self.encoded_before_start: dict[str, float] = {}  # the clock at Started and at the end of step 1
        self.encoded_by_step_1: dict[str, float] = {}
        self.times: list[float] = []
        self.image_seconds: list[float] = []  # the clock's image encoding at each step (left out of step times)
        self.faults: list[int] = []
        self.cpu: list[float] = []
        self.flops: float | None = None
        self._modes = contextlib.ExitStack()
        self._profiler: Any = None
        self._counter: Any = None

    def __call__(self, event: Any) -> None:
        from finetune_core.train.events import Started, StepEvent
        if isinstance(event, Started):
            self.started = time.perf_counter()
            self.encoded_before_start = self.clock.snapshot()
        if not isinstance(event, StepEvent):
            return
        self.times.append(time.perf_counter())
        self.image_seconds.append(self.clock.seconds["latents"])
        if len(self.times) == 1:
            self.encoded_by_step_1 = self.clock.snapshot()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.faults.append(usage.ru_minflt)
        self.cpu.append(usage.ru_utime + usage.ru_stime - self.clock.image_cpu_seconds)  # less the images encoded
        done, timed = len(self.times), self.spec.steps
        if done == 1 and self.spec.profile_path:
            self._profiler = self._modes.enter_context(_profiler())
        if done == 1 + timed:
            self._finish_profile()
            if self.spec.count_flops:
                self._counter = self._modes.enter_context(flop_counter())
                self.clock.counting = True
        if done == 2 + timed and self._counter is not None:
            self._modes.close()
            self.clock.counting = False
            self.flops = float(self._counter.get_total_flops()) - self.clock.image_flops

    def _finish_profile(self) -> None:
        if self._profiler is None:
            return
        self._modes.close()
        table = self._profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        Path(self.spec.profile_path or "").write_text(table, encoding="utf-8")
        self._profiler = None


def flop_counter() -> Any:
    """`FlopCounterMode`, also counting CPU attention: torch counts the CUDA flash/efficient SDPA kernels but not
    `_scaled_dot_product_flash_attention_for_cpu`, which left about a tenth of an SD step out of its floor."""
    import torch
    from torch.utils import flop_counter as fc

    def forward(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return int(fc.sdpa_flop_count(query, key, value))

    def backward(grad: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kw: Any) -> int:
        return int(fc.sdpa_backward_flop_count(grad, query, key, value))
    aten = torch.ops.aten
    extra: dict[Any, Any] = {}
    if hasattr(fc, "sdpa_flop_count") and hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu] = forward
        extra[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return fc.FlopCounterMode(display=False, custom_mapping=extra)


def _profiler() -> Any:
    from torch.profiler import ProfilerActivity, profile
    return profile(activities=[ProfilerActivity.CPU])


def _load(model_name: str, device: str) -> Any:
    if model_name == FULL_SD15:
        from finetune_core.model.full_size import full_size_random
        return full_size_random("sd1", device=device)
    from finetune_core.model.loading import load_model
    return load_model(model_name, device=device)


def _emulate_unet_gradients(model: Any) -> None:
    """What a job did on the WebUI's model before it froze what it does not train: the UNet's weights keep
    requires_grad=True (the WebUI never clears it), so every step computes and accumulates their gradients."""
    session = model.training_session

    @contextlib.contextmanager
    def with_unet_gradients(setup: Any) -> Any:
        with session(setup) as opened:
            unet = model.trainable_modules()["unet"]
            unet.requires_grad_(True)
            try:
                yield opened
            finally:
                unet.requires_grad_(False)

    model.training_session = with_unet_gradients


def run(spec: RunSpec, t_start: float) -> RunResult | None:
    """Measure one run in this process; `t_start` is when the process began (before importing torch)."""
    import torch

    from finetune_core.cpu import set_threads
    from finetune_core.jobs import service
    from finetune_core.train.distributed import join_processes
    run_keys = spec.settings.get("run", {})
    processes = join_processes(run_keys.get("device"))  # one, unless accelerate launch started several
    threads = set_threads(int(run_keys["threads"]) if "threads" in run_keys else None)
    device = run_keys.get("device") or str(processes.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_imported = time.perf_counter()
    before = matmul_rate(device)
    probe = time.perf_counter() - t_imported
    model = _load(spec.model, device)
    if str(run_keys.get("channels_last", "")).lower() in ("1", "true", "yes"):
        model.unet.to(memory_format=torch.channels_last)
    if str(run_keys.get("unet_grads", "")).lower() in ("1", "true", "yes"):
        _emulate_unet_gradients(model)
    t_loaded = time.perf_counter()
    settings = request_settings(spec.model, spec.method, spec.settings, spec.steps + 1 + spec.count_flops)
    recorder = _Recorder(spec, EncoderClock(model))
    request = service.TrainRequest(spec.method, "bench", settings["method"], settings["data"], settings["train"])
    with tempfile.TemporaryDirectory() as out, recorder.clock:
        out = processes.share(out)  # one output folder for all processes: the main one writes
        service.train(request, model, service.OutputFolders.standalone(out), on_event=recorder, processes=processes)
    if not processes.is_main:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    first = recorder.times[0]
    timed = [t - encoded for t, encoded in zip(recorder.times, recorder.image_seconds)][: spec.steps + 1]
    phases = first_step_phases((t_start, t_imported, t_loaded), probe, recorder)
    return RunResult(
        step_seconds=[b - a for a, b in zip(timed, timed[1:])], first_step_seconds=first - t_start - probe,
        phases=phases, peak_rss_mib=peak,
        peak_device_mib=torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
        faults_per_step=(recorder.faults[spec.steps] - recorder.faults[0]) / spec.steps,
        cpu_seconds_per_step=(recorder.cpu[spec.steps] - recorder.cpu[0]) / spec.steps,
        matmul_before=before, matmul_after=matmul_rate(device),
        step_gflop=recorder.flops / 1e9 if recorder.flops is not None else None, threads=threads, device=device,
        size=f"{settings['data']['width']}x{settings['data']['height']}",
        images_seconds=recorder.image_seconds[spec.steps] - recorder.image_seconds[0])


def first_step_phases(times: tuple[float, float, float], probe: float, recorder: _Recorder) -> dict[str, float]:
    """Where the time to the end of the first step went, in seconds (`times`: process start, imports done, model
    loaded; the matmul probe between the last two is left out). The encoders' time is taken out of the setup
    (encoded before the loop started) and out of step 1 (encoded inside it) and shown on its own."""
    t_start, t_imported, t_loaded = times
    before, by_step_1 = recorder.encoded_before_start, recorder.encoded_by_step_1
    step_1 = recorder.times[0] - recorder.started
    return {"import": t_imported - t_start,
            "load": t_loaded - t_imported - probe,
            "setup": recorder.started - t_loaded - sum(before.values()),
            "latents": by_step_1["latents"], "text": by_step_1["text"],
            "step 1": step_1 - sum(by_step_1[k] - before[k] for k in by_step_1)}


def child_main(spec_json: str, t_start: float) -> None:
    """Entry of the run's process: print the result as one marked JSON line."""
    from finetune_core.cpu import prepare_process
    prepare_process()  # what the CLI does at its start, before torch loads
    spec = RunSpec(**json.loads(spec_json))
    result = run(spec, t_start)
    if result is not None:  # None: a process of a data-parallel run other than the main one
        print(RESULT_MARKER + json.dumps(asdict(result)), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":  # a process of a data-parallel run (`processes=N`), started by accelerate launch
    child_main(sys.argv[1], time.perf_counter())  # this module imports no torch: the run's imports are still timed
