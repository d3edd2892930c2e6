"""The benchmark's bookkeeping: settings parsing, checks before any run, A/B alternation, flags, summaries.

One real run of the tiny model checks the measurement itself; timings are never asserted.
"""

from __future__ import annotations

import time

import pytest

from finetune_core.bench import case, report, runner
from finetune_core.bench.run_settings import parse_settings
from finetune_core.cli import main
from finetune_core.errors import ConfigError

TI = "textual-inversion"


def test_settings_go_to_their_sections() -> None:
    s = parse_settings("batch_size=2, precision=bf16,num_vectors=3,threads=1,MALLOC_ARENA_MAX=2,"
                       "train.seed=5,channels_last=true", TI)
    assert s.sections == {"method": {"num_vectors": "3"}, "data": {"batch_size": "2"},
                          "train": {"precision": "bf16", "seed": "5"}}
    assert s.run == {"threads": "1", "channels_last": "true"} and s.env == {"MALLOC_ARENA_MAX": "2"}
    merged = s.merged(parse_settings("batch_size=4,OMP_WAIT_POLICY=ACTIVE", TI))
    assert merged.sections["data"] == {"batch_size": "4"} and merged.env["OMP_WAIT_POLICY"] == "ACTIVE"
    assert parse_settings("", TI).sections == {"method": {}, "data": {}, "train": {}}


@pytest.mark.parametrize("text,message", [
    ("no_such_setting=1", "unknown setting 'no_such_setting'"),
    ("batch_size", "not name=value"),
    ("method.batch_size=2", "it is a data setting"),
    ("steps=3", "use --steps"),
    ("data_dir=/tmp", "examples/dataset"),
])
def test_bad_settings_are_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_settings(text, TI)


def _options(**kw) -> runner.BenchOptions:
    values = {"models": ["tiny-sd1"], "methods": [TI], "steps": 2, "repeats": 1, **kw}
    return runner.BenchOptions(**values)


def test_full_and_models_name_the_full_size_model_once() -> None:
    from types import SimpleNamespace
    args = SimpleNamespace(models="tiny-sd1,sd15-full", full=True, methods=TI, steps=2, repeats=1, set="",
                           compare=None, margin=0.1, threads=None, profile=None)
    assert runner.BenchOptions.from_args(args).models == ["tiny-sd1", runner.FULL_SD15]


def test_every_problem_is_found_before_anything_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "run_once", lambda *a: pytest.fail("a run started"))
    options = _options(models=["tiny-sd1", "no-such-model"],
                       compare=("batch_size=0", "threads=0,device=gpu7,processes=0"), repeats=0)
    with pytest.raises(ConfigError) as caught:
        runner.run_bench(options)
    text = str(caught.value)
    for part in ("--repeats must be at least 1", "no model 'no-such-model'", "threads must be a whole number",
                 "processes must be a whole number",
                 "batch_size", "device 'gpu7' is not a device name"):
        assert part in text


def _record(seconds: float, before: float = 100.0, after: float = 100.0, others: float | None = 0.0,
            gflop: float | None = 2.0) -> runner.RunRecord:
    result = case.RunResult([seconds, seconds * 1.1, seconds * 0.9], 3.0, {"import": 1.0, "load": 1.0},
                            500.0, None, 1000.0, seconds * 2, before, after, gflop, 2, "cpu", "64x64")
    return runner.RunRecord(result, 0.5, others)


def test_compare_alternates_the_sides_and_counts_flops_once_per_side(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[tuple[str, bool]] = []

    def fake_run(spec: case.RunSpec, env: dict[str, str]) -> runner.RunRecord:
        order.append((spec.settings["sections"]["data"].get("batch_size", "?"), spec.count_flops))
        assert env == ({"MALLOC_ARENA_MAX": "2"} if spec.settings["sections"]["data"]["batch_size"] == "2" else {})
        return _record(0.1)
    monkeypatch.setattr(runner, "run_once", fake_run)
    options = _options(compare=("batch_size=1", "batch_size=2,MALLOC_ARENA_MAX=2"), repeats=3)
    [done] = runner.run_bench(options)
    assert order == [("1", True), ("2", True), ("2", False), ("1", False), ("1", False), ("2", False)]
    assert len(done.runs["A"]) == len(done.runs["B"]) == 3


def test_flags_name_a_moving_matmul_rate_and_a_busy_machine() -> None:
    assert runner.flags_of(_record(0.1, 100, 95), margin=0.10) == []
    moved = runner.flags_of(_record(0.1, 100, 80), margin=0.10)
    assert len(moved) == 1 and "100 -> 80" in moved[0]
    busy = runner.flags_of(_record(0.1, others=0.4), margin=0.10)
    assert busy == ["other processes used 40% of the CPUs during the run"]


def test_summary_and_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    summary = report.summarize([_record(0.1), _record(0.2, before=50), _record(0.3)])
    assert summary is not None and summary.runs == 3
    assert summary.seconds_per_step == pytest.approx(0.2) and summary.spread == pytest.approx(1.0)
    assert summary.matmul == (50, 100) and summary.floor_seconds == pytest.approx(2.0 / 100)
    assert summary.achieved == pytest.approx(0.02 / 0.2)
    failed = runner.RunRecord(None, 0.1, None, error="exit 1: boom")
    assert report.summarize([failed]) is None
    runs = runner.CaseRuns("tiny-sd1", TI, {"A": parse_settings("", TI), "B": parse_settings("", TI)},
                           {"A": [_record(0.1), _record(0.1)], "B": [_record(0.15), _record(0.25), failed]})
    report.print_case(runs, _options(compare=("", "")))
    out = capsys.readouterr().out
    assert "B/A: s/step 2.000x (rounds 1.500-2.500), CPU s/step 2.000x" in out
    assert "run 3 (B) failed: exit 1: boom" in out
    assert "10.00 steps/s; first step" in out  # side A: 0.1 s/step


def test_a_run_of_several_processes_goes_through_accelerate_launch(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess
    import sys
    seen: list[list[str]] = []

    def fake(command, **kwargs):
        seen.append(command)
        return subprocess.CompletedProcess(command, 1, "", "boom")
    monkeypatch.setattr(subprocess, "run", fake)
    spec = case.RunSpec("tiny-sd1", TI, parse_settings("processes=2", TI).to_dict(), steps=1)
    assert runner.run_once(spec, {}).error == "exit 1: boom"
    assert seen[0][:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert seen[0][seen[0].index("--num_processes") + 1] == "2"
    assert seen[0][-2] == "finetune_core.bench.case"
    runs = runner.CaseRuns("tiny-sd1", TI, {"": parse_settings("processes=2", TI)}, {"": [_record(0.5)]})
    report.print_case(runs, _options())
    assert "2.00 steps/s (per-process figures: the main one of 2)" in capsys.readouterr().out


def test_one_real_run_measures_steps_flops_and_faults(monkeypatch: pytest.MonkeyPatch, tiny_model) -> None:
    monkeypatch.setattr(case, "_load", lambda name, device: tiny_model(name))  # the session's copy: no rebuild
    settings = parse_settings("batch_size=2,threads=1", TI).to_dict()
    result = case.run(case.RunSpec("tiny-sd1", TI, settings, steps=2, count_flops=True), time.perf_counter())
    assert len(result.step_seconds) == 2 and all(s > 0 for s in result.step_seconds)
    assert result.step_gflop is not None and result.step_gflop > 0
    assert result.size == "64x64" and result.threads == 1 and result.faults_per_step >= 0
    assert result.cpu_seconds_per_step > 0
    assert list(result.phases) == ["import", "load", "setup", "latents", "text", "step 1"]
    assert result.phases["latents"] > 0 and result.phases["text"] > 0 and result.phases["step 1"] > 0
    assert sum(result.phases.values()) == pytest.approx(result.first_step_seconds) and result.matmul_before > 0
    model = tiny_model("tiny-sd1")
    assert "encode_images" not in vars(model) and "encode_prompts" not in vars(model)  # the clock is off again
    assert result.images_seconds > 0  # 7 images at batch 2: the timed steps draw images for the first time


def test_the_clock_leaves_image_encoding_out_of_the_counted_step() -> None:
    import torch

    class Model:
        device = torch.device("cpu")

        def encode_images(self, x):
            return x @ x

        def encode_prompts(self, x):
            return x @ x

    x = torch.ones(8, 8)
    model = Model()
    with case.EncoderClock(model) as clock, case.flop_counter() as step:
        clock.counting = True
        model.encode_images(x)
        model.encode_prompts(x)  # text encoding stays in the step
        x @ x
    assert clock.image_flops == 2 * 8**3 and step.get_total_flops() - clock.image_flops == 2 * 2 * 8**3
    assert clock.seconds["latents"] > 0 and clock.seconds["text"] > 0 and "encode_images" not in vars(model)


def test_a_failing_run_is_reported_not_raised() -> None:
    spec = case.RunSpec("no-such-model", TI, parse_settings("", TI).to_dict(), steps=1)
    record = runner.run_once(spec, {})
    assert record.result is None and "no-such-model" in record.error


def test_cli_refuses_a_bad_bench_request(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--models", "tiny-sd1", "--methods", TI, "--compare", "threads=1", "bogus=2"]) == 2
    assert "unknown setting 'bogus'" in capsys.readouterr().err


def test_the_flop_count_includes_cpu_attention() -> None:
    import torch
    q, k, v = (torch.randn(2, 4, 64, 16, requires_grad=True) for _ in range(3))
    with case.flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
    # forward: QK^T and AV, 2*b*h*s*s*d each; backward: five such products (scores recomputed)
    assert counter.get_total_flops() == 7 * 2 * 2 * 4 * 64 * 64 * 16


def test_run_settings_are_typed_from_command_line_text() -> None:
    """Numbers as the CLI types them; a bool field takes the words true / false, and anything else is refused."""
    sections = parse_settings("gradient_checkpointing=False,batch_size=2,precision=bf16", TI).to_dict()
    typed = case.request_settings("tiny-sd1", TI, sections, steps=3)
    assert typed["train"]["gradient_checkpointing"] is False and typed["data"]["batch_size"] == 2
    runner.validate("tiny-sd1", TI, parse_settings("gradient_checkpointing=true", TI), 3)
    with pytest.raises(ConfigError, match="true or false"):
        runner.validate("tiny-sd1", TI, parse_settings("gradient_checkpointing=maybe", TI), 3)


def test_a_method_bool_setting_takes_the_words_too() -> None:
    on = parse_settings("reconstruction=TRUE,attention_masks=false,train.save_optimizer_state=true", "dreamartist")
    settings = case.request_settings("tiny-sd1", "dreamartist", on.to_dict(), 2)
    assert settings["method"]["reconstruction"] is True and settings["data"]["attention_masks"] is False
    assert settings["train"]["save_optimizer_state"] is True
