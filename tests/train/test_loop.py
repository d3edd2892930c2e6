"""The training loop end to end on a tiny fake model: events, saves, CSV, determinism, interrupt, resume, guard."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_core.errors import ArtifactError, ConfigError, TrainingDiverged
from finetune_core.methods.base import InferenceExtras, StatePolicy
from finetune_core.model.interface import TrainingSetup
from finetune_core.train.control import Control
from finetune_core.train.events import ArtifactSaved, Failed, Finished, PreviewEvent, Started, StepEvent, Warning_
from finetune_core.train.loop import OutputSpec, existing_artifacts, resume_training, run_training
from finetune_core.train.run_folder import RunFolder
from finetune_core.train.train_config import TrainConfig

from .fakes import FakeData, FakeMethod, FakeModel, read_vector

BASE = TrainConfig(steps=6, learning_rate="0.05", save_every=0, preview_every=0, csv_every=0)


def train(tmp: Path, config: TrainConfig = BASE, method: FakeMethod | None = None, data: FakeData | None = None,
          run: str = "run", out: str = "out", **kwargs: Any) -> tuple[Any, FakeMethod, list[Any]]:
    events: list[Any] = []
    sink = kwargs.pop("on_event", None)

    def on_event(event: Any) -> None:
        events.append(event)
        if sink is not None:
            sink(event)
    method = method or FakeMethod()
    model = kwargs.pop("model", None) or FakeModel()
    result = run_training(model, method, data or FakeData(), config, RunFolder(tmp / run),
                          OutputSpec(tmp / out, "emb", kwargs.pop("overwrite", False)), on_event=on_event, **kwargs)
    return result, method, events


def test_training_changes_the_vector_and_writes_the_final_artifact(tmp_path: Path) -> None:
    result, method, _events = train(tmp_path)
    assert result.step == 6 and not result.interrupted
    assert result.artifacts == (tmp_path / "out" / "emb.pt",)
    assert torch.equal(read_vector(result.artifacts[0]), method.vector.detach())
    assert not torch.allclose(method.vector.detach(), torch.full((8,), 0.1))
    assert method.after_steps == 6


def test_events_come_in_order_with_eta(tmp_path: Path) -> None:
    config = dataclasses.replace(BASE, save_every=3, preview_every=3)
    _result, _method, events = train(tmp_path, config)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Started", "StepEvent", "StepEvent", "StepEvent", "ArtifactSaved", "PreviewEvent",
                     "StepEvent", "StepEvent", "StepEvent", "ArtifactSaved", "PreviewEvent", "ArtifactSaved",
                     "Finished"]
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert [e.step for e in steps] == [1, 2, 3, 4, 5, 6]
    assert all(e.total_steps == 6 and e.learning_rate == pytest.approx(0.05) for e in steps)
    assert steps[-1].eta_seconds == 0 and steps[0].eta_seconds >= 0
    assert steps[0].prompt.startswith("item ")
    assert isinstance(events[0], Started) and events[0].total_steps == 6 and events[0].start_step == 0
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.step == 6 and not finished.interrupted


def test_save_every_writes_intermediate_artifacts_and_state(tmp_path: Path) -> None:
    config = dataclasses.replace(BASE, save_every=2)
    _result, _method, events = train(tmp_path, config)
    saved = [e for e in events if isinstance(e, ArtifactSaved) and not e.final]
    assert [e.step for e in saved] == [2, 4, 6]
    for event in saved:
        assert event.paths == (tmp_path / "run" / "artifacts" / f"emb-{event.step}.pt",)
        assert event.paths[0].is_file()
    assert RunFolder(tmp_path / "run").has_state()
    assert (tmp_path / "run" / "settings.json").is_file()


def test_loss_csv_has_webui_columns(tmp_path: Path) -> None:
    config = dataclasses.replace(BASE, csv_every=2)
    _result, _method, events = train(tmp_path, config)
    rows = RunFolder(tmp_path / "run").loss_rows()
    losses = [e.loss for e in events if isinstance(e, StepEvent)]
    assert [r.step for r in rows] == [2, 4, 6]
    assert rows[0].loss == pytest.approx(sum(losses[:2]) / 2, rel=1e-5)
    assert rows[0].learn_rate == pytest.approx(0.05)
    assert [(r.epoch, r.epoch_step) for r in rows] == [(0, 2), (0, 4), (1, 2)]  # 4 batches per epoch
    header = (tmp_path / "run" / "loss.csv").read_text().splitlines()[0]
    assert header == "step,epoch,epoch_step,loss,learn_rate"


def test_two_runs_with_the_same_seed_are_equal_and_another_seed_differs(tmp_path: Path) -> None:
    _r1, m1, _ = train(tmp_path, run="a", out="a")
    _r2, m2, _ = train(tmp_path, run="b", out="b")
    _r3, m3, _ = train(tmp_path, dataclasses.replace(BASE, seed=5), run="c", out="c")
    assert torch.equal(m1.vector, m2.vector)
    assert not torch.equal(m1.vector, m3.vector)


def test_random_seed_is_resolved_and_recorded(tmp_path: Path) -> None:
    result, _method, _events = train(tmp_path, dataclasses.replace(BASE, seed=-1))
    assert result.seed >= 0
    assert json.loads((tmp_path / "run" / "settings.json").read_text())["seed"] == result.seed


def test_schedule_stops_training_and_changes_the_rate(tmp_path: Path) -> None:
    config = dataclasses.replace(BASE, steps=100, learning_rate="0.05:2, 0.01:4")
    result, _method, events = train(tmp_path, config)
    rates = [e.learning_rate for e in events if isinstance(e, StepEvent)]
    assert result.step == 4
    assert rates == pytest.approx([0.05, 0.05, 0.01, 0.01])


def test_interrupt_saves_and_stops(tmp_path: Path) -> None:
    control = Control()

    def stop_at_3(event: Any) -> None:
        if isinstance(event, StepEvent) and event.step == 3:
            control.interrupt()
    result, method, events = train(tmp_path, control=control, on_event=stop_at_3)
    assert result.interrupted and result.step == 3
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.interrupted and finished.step == 3
    assert torch.equal(read_vector(tmp_path / "out" / "emb.pt"), method.vector.detach())
    assert RunFolder(tmp_path / "run").has_state()


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_after_interrupt_is_exact(tmp_path: Path, accumulation: int) -> None:
    config = dataclasses.replace(BASE, steps=8, gradient_accumulation=accumulation, save_every=3, csv_every=2,
                                 learning_rate="0.05:5, 0.02", clip_grad_mode="norm", clip_grad_value="0.5:4, 0.2")
    _full, full_method, _ = train(tmp_path, config, run="full", out="full")
    control = Control()

    def stop_at_5(event: Any) -> None:
        if isinstance(event, StepEvent) and event.step == 5:
            control.interrupt()
    part, _m, _ = train(tmp_path, config, run="part", out="part", control=control, on_event=stop_at_5)
    assert part.interrupted and part.step == 5
    fresh = FakeMethod()
    events: list[Any] = []
    resumed = resume_training(FakeModel(), fresh, FakeData(), RunFolder(tmp_path / "part"),
                              OutputSpec(tmp_path / "part_out_unused", "emb"), on_event=events.append)
    assert resumed.step == 8 and not resumed.interrupted
    assert isinstance(events[0], Started) and events[0].start_step == 5
    assert torch.equal(fresh.vector, full_method.vector)
    assert torch.equal(read_vector(resumed.artifacts[0]), read_vector(tmp_path / "full" / "emb.pt"))
    assert RunFolder(tmp_path / "part").loss_rows() == RunFolder(tmp_path / "full").loss_rows()


def test_resume_over_its_own_interrupted_artifact_is_allowed(tmp_path: Path) -> None:
    control = Control()

    def stop_at_2(event: Any) -> None:
        if isinstance(event, StepEvent) and event.step == 2:
            control.interrupt()
    train(tmp_path, control=control, on_event=stop_at_2)
    result = resume_training(FakeModel(), FakeMethod(), FakeData(), RunFolder(tmp_path / "run"),
                             OutputSpec(tmp_path / "out", "emb"))
    assert result.step == 6


def test_existing_output_is_refused_before_training(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "emb.pt").write_bytes(b"user file")
    data = FakeData()
    events: list[Any] = []
    with pytest.raises(ArtifactError, match="emb.pt"):
        train(tmp_path, data=data, on_event=events.append)
    assert data.prepared == 0 and (tmp_path / "out" / "emb.pt").read_bytes() == b"user file"
    assert isinstance(events[-1], Failed)
    result, _method, _events = train(tmp_path, overwrite=True)
    assert result.artifacts[0].read_bytes() != b"user file"


def test_unknown_optimizer_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="optimizer"):
        train(tmp_path, dataclasses.replace(BASE, optimizer="adafactor"))


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path: Path) -> None:
    config = dataclasses.replace(BASE, steps=1, optimizer="sgd", learning_rate="1.0")
    _r, big, _ = train(tmp_path, config, method=FakeMethod(dropout=0), data=FakeData(batch_size=2), run="a", out="a")
    accum = dataclasses.replace(config, gradient_accumulation=2)
    _r, small, _ = train(tmp_path, accum, method=FakeMethod(dropout=0), data=FakeData(batch_size=1), run="b", out="b")
    start = torch.full((8,), 0.1)
    assert not torch.allclose(big.vector, start)
    torch.testing.assert_close(big.vector - start, small.vector - start, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["value", "norm"])
def test_clipping_limits_the_update(tmp_path: Path, mode: str) -> None:
    config = dataclasses.replace(BASE, steps=2, optimizer="sgd", learning_rate="1.0", clip_grad_mode=mode,
                                 clip_grad_value="0.001:1, 0.01")
    _r, method, _events = train(tmp_path, config, method=FakeMethod(dropout=0))
    # replay step by step: step 1 uses clip 0.001, step 2 uses 0.01
    one = dataclasses.replace(config, steps=1)
    _r, m1, _ = train(tmp_path, one, method=FakeMethod(dropout=0), run="r1", out="o1")
    first_run_delta = m1.vector.detach() - 0.1
    second_delta = method.vector.detach() - m1.vector.detach()
    if mode == "value":
        assert first_run_delta.abs().max() <= 0.001 + 1e-7
        assert second_delta.abs().max() <= 0.01 + 1e-7 and second_delta.abs().max() > 0.001 + 1e-6
    else:
        assert first_run_delta.norm() == pytest.approx(0.001, rel=1e-4)
        assert second_delta.norm() == pytest.approx(0.01, rel=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_precisions_run_on_cpu(tmp_path: Path, precision: str) -> None:
    result, method, events = train(tmp_path, dataclasses.replace(BASE, steps=2, precision=precision))
    losses = [e.loss for e in events if isinstance(e, StepEvent)]
    assert result.step == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert method.vector.dtype == torch.float32


def test_min_snr_and_v_prediction_run(tmp_path: Path) -> None:
    config = dataclasses.replace(BASE, steps=2, min_snr_gamma=5.0, noise_offset=0.1)
    events: list[Any] = []
    run_training(FakeModel("v_prediction"), FakeMethod(), FakeData(alpha=True), config, RunFolder(tmp_path / "r"),
                 OutputSpec(tmp_path / "o", "emb"), on_event=events.append)
    _r, _m, plain = train(tmp_path, dataclasses.replace(BASE, steps=2))
    weighted = [e.loss for e in events if isinstance(e, StepEvent)]
    assert len(weighted) == 2 and weighted != [e.loss for e in plain if isinstance(e, StepEvent)]


def test_text_is_encoded_once_per_prompt(tmp_path: Path) -> None:
    model = FakeModel()
    run_training(model, FakeMethod(), FakeData(), BASE, RunFolder(tmp_path / "r"), OutputSpec(tmp_path / "o", "emb"))
    assert sorted(model.encoded) == sorted(set(model.encoded)) and len(model.encoded) == 4
    assert model.placements == 1  # one placement for the whole training phase, not one per step


def test_nan_steps_are_skipped_then_rolled_back_with_a_lower_rate(tmp_path: Path) -> None:
    config = dataclasses.replace(BASE, steps=6, nan_guard_bad_steps=3)
    result, method, events = train(tmp_path, config, method=FakeMethod(nan_calls=(3, 4, 5)))
    warnings = [e for e in events if isinstance(e, Warning_)]
    assert len(warnings) == 1 and "rolled back to step 0" in warnings[0].message
    steps = [e for e in events if isinstance(e, StepEvent)]
    # steps 1 and 2 done, three bad tries, rollback to step 0 (the last good state), then 6 steps at half the rate
    assert [e.step for e in steps] == [1, 2, 1, 2, 3, 4, 5, 6]
    assert [e.learning_rate for e in steps] == pytest.approx([0.05, 0.05] + [0.025] * 6)
    assert result.step == 6 and torch.isfinite(method.vector).all()


def test_a_single_nan_step_is_only_skipped(tmp_path: Path) -> None:
    result, method, events = train(tmp_path, method=FakeMethod(nan_calls=(2,)))
    assert not [e for e in events if isinstance(e, Warning_)]
    assert result.step == 6 and method.calls == 7


def test_persistent_nan_raises_training_diverged(tmp_path: Path) -> None:
    config = dataclasses.replace(BASE, nan_guard_bad_steps=2, nan_guard_max_rollbacks=2)
    events: list[Any] = []
    with pytest.raises(TrainingDiverged, match="fp32 or bf16"):
        train(tmp_path, config, method=FakeMethod(nan_calls=tuple(range(1, 100))), on_event=events.append)
    assert len([e for e in events if isinstance(e, Warning_)]) == 2
    assert isinstance(events[-1], Failed)


def test_previews_use_training_prompt_and_do_not_change_training(tmp_path: Path) -> None:
    model = FakeModel()
    config = dataclasses.replace(BASE, preview_every=2)
    _r, with_previews, events = train(tmp_path, config, model=model, run="a", out="a")
    _r, without, _ = train(tmp_path, run="b", out="b")
    assert torch.equal(with_previews.vector, without.vector)
    previews = [e for e in events if isinstance(e, PreviewEvent)]
    assert [p.step for p in previews] == [2, 4, 6] and all(p.path.is_file() for p in previews)
    request = model.samples[0]
    assert request.prompts[0].startswith("item ") and request.negative_prompts == ("fake-neg",)
    assert (request.width, request.height, request.steps, request.sampler) == (32, 32, 20, "DPM++ 2M")
    assert len({r.seed for r in model.samples}) == 1  # one seed per run: previews compare side by side
    from PIL import Image  # each carries its parameters as the WebUI's PNGs do (PNG Info, Send to txt2img)
    with Image.open(previews[0].path) as image:
        info = image.info["parameters"]
    assert info.startswith(f"{request.prompts[0]}\nNegative prompt: fake-neg\nSteps: 20, Sampler: DPM++ 2M, ")
    assert f"Seed: {request.seed}, Size: 32x32, Model hash: " in info and info.endswith(" step 2")


def test_a_failing_preview_is_a_warning_and_costs_no_training(tmp_path: Path) -> None:
    """The host's sampler raising (the WebUI's txt2img tried to download a file, as SDXL's VAE approximation does)
    at the first preview: one warning, no more previews, and the run trains exactly as without previews."""
    from urllib.error import URLError

    class Offline(FakeModel):
        def sample(self, request: Any, *args: Any, **kwargs: Any) -> list[Any]:
            self.samples.append(request)
            raise URLError("no network")

    model = Offline()
    result, with_failure, events = train(tmp_path, dataclasses.replace(BASE, preview_every=2), model=model,
                                         run="a", out="a")
    _r, without, _ = train(tmp_path, run="b", out="b")
    assert result.step == 6 and not any(isinstance(e, Failed) for e in events)
    assert torch.equal(with_failure.vector, without.vector)
    warnings = [e.message for e in events if isinstance(e, Warning_)]
    assert len(warnings) == 1 and "preview at step 2 failed (URLError" in warnings[0] and "goes on" in warnings[0]
    assert len(model.samples) == 1 and not any(isinstance(e, PreviewEvent) for e in events)


def test_previews_get_the_methods_extras_and_no_adapters_unless_it_has_some(tmp_path: Path) -> None:
    class WithAdapters(FakeMethod):
        def inference_extras(self) -> InferenceExtras:
            return InferenceExtras(adapters={"lora_unet_x": lambda x: x})

    config = dataclasses.replace(BASE, preview_every=3)
    plain, adapted = FakeModel(), FakeModel()
    train(tmp_path, config, model=plain, run="a", out="a")
    train(tmp_path, config, model=adapted, method=WithAdapters(), run="b", out="b")
    assert [extras[2] for extras in plain.sample_extras] == [None, None]  # nothing replaces what is active
    assert [set(extras[2]) for extras in adapted.sample_extras] == [{"lora_unet_x"}] * 2


def test_pause_blocks_until_resumed(tmp_path: Path) -> None:
    control = Control()
    resumed = threading.Event()

    def pause_at_2(event: Any) -> None:
        if isinstance(event, StepEvent) and event.step == 2:
            control.pause()
            threading.Timer(0.2, lambda: (resumed.set(), control.resume())).start()
    _result, _method, events = train(tmp_path, control=control, on_event=pause_at_2)
    assert resumed.is_set() and events[-1].step == 6


def test_a_method_can_name_its_artifact_files(tmp_path: Path) -> None:
    class Named(FakeMethod):
        def artifact_paths(self, directory: Path, stem: str) -> list[Path]:
            return [directory / f"{stem}.safetensors"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "emb.txt").write_text("unrelated")
    assert existing_artifacts(Named(), tmp_path / "out", "emb") == []
    assert existing_artifacts(FakeMethod(), tmp_path / "out", "emb") == [tmp_path / "out" / "emb.txt"]
    (tmp_path / "out" / "emb.safetensors").write_text("x")
    with pytest.raises(ArtifactError, match="emb.safetensors"):
        train(tmp_path, method=Named())


def test_no_optimizer_file_the_webui_cannot_load_is_written_and_the_user_is_told(tmp_path: Path) -> None:
    config = dataclasses.replace(BASE, save_optimizer_state=True)
    result, _method, events = train(tmp_path, config)  # FakeMethod keeps the default: no WebUI sidecar
    assert result.artifacts == (tmp_path / "out" / "emb.pt",)
    warnings = [e.message for e in events if isinstance(e, Warning_)]
    assert any("no optimizer state file" in w for w in warnings)


def test_a_method_without_rollback_snapshots_stops_with_advice(tmp_path: Path) -> None:
    class Big(FakeMethod):
        state_policy = StatePolicy(rollback_snapshots=False, resume_state=False)

    config = dataclasses.replace(BASE, nan_guard_bad_steps=2, save_every=2)
    with pytest.raises(TrainingDiverged, match="no in-memory copy"):
        train(tmp_path, config, method=Big(nan_calls=tuple(range(3, 100))))
    state = torch.load(tmp_path / "run" / "state" / "checkpoint.pt", weights_only=True)
    assert "params" not in state and "optimizer" not in state  # the policy keeps the big state out
    with pytest.raises(ArtifactError, match="kept no resume state"):
        resume_training(FakeModel(), Big(), FakeData(), RunFolder(tmp_path / "run"),
                        OutputSpec(tmp_path / "out", "emb"))


def test_interrupt_during_preparation_trains_and_writes_nothing(tmp_path: Path) -> None:
    control = Control()

    class Preparing(FakeMethod):
        def prepare(self, context: Any) -> None:
            for i in range(5):
                context.progress("class images", i, 5)
                if i == 2:
                    control.interrupt()

    result, method, events = train(tmp_path, control=control, method=Preparing())
    assert result.interrupted and result.step == 0 and result.artifacts == ()
    assert method.calls == 0 and not (tmp_path / "out").exists()
    phases = [e for e in events if type(e).__name__ == "Phase"]
    assert [p.done for p in phases] == [0, 1, 2, 3]  # the progress call after the interrupt stops the phase


def test_the_session_gets_the_methods_modules_precision_and_checkpointing(tmp_path: Path) -> None:
    class Tuning(FakeMethod):
        trains = ("unet",)

    model = FakeModel()
    config = dataclasses.replace(BASE, precision="bf16", gradient_checkpointing=False, steps=1)
    train(tmp_path, config, model=model, method=Tuning())
    assert model.sessions == [TrainingSetup(("unet",), "bf16", False)]
    assert not any(p.requires_grad for p in model.conv.parameters())  # given back frozen, as it came


def test_only_the_last_copies_are_kept(tmp_path: Path) -> None:
    from finetune_core.train.loop import prune_copies

    config = dataclasses.replace(BASE, save_every=1, save_keep_last=2)
    (tmp_path / "run" / "artifacts").mkdir(parents=True)
    mine = tmp_path / "run" / "artifacts" / "notes.txt"
    mine.write_text("a user's file")
    _result, _method, events = train(tmp_path, config)
    saved = [e for e in events if isinstance(e, ArtifactSaved) and not e.final]
    assert len(saved) == 6
    left = sorted(p.name for p in (tmp_path / "run" / "artifacts").iterdir())
    assert left == ["emb-5.pt", "emb-6.pt", "notes.txt"]
    assert prune_copies(tmp_path / "run" / "artifacts", "emb", 0) == []  # 0 keeps every copy


def test_a_copy_the_disk_has_no_room_for_is_skipped_with_a_warning(tmp_path: Path) -> None:
    from finetune_core.errors import StorageError

    class FullDisk(FakeMethod):
        def write_artifact(self, directory: Path, stem: str, meta: Any, overwrite: bool) -> list[Path]:
            if "-" in stem:
                raise StorageError(f"the disk of {directory} has 0.00 GiB free")
            return super().write_artifact(directory, stem, meta, overwrite)

    config = dataclasses.replace(BASE, save_every=2)
    result, _method, events = train(tmp_path, config, method=FullDisk())
    warnings = [e.message for e in events if isinstance(e, Warning_)]
    assert len(warnings) == 3 and "the copy at step 2 was not saved" in warnings[0] and "goes on" in warnings[0]
    assert result.step == 6 and result.artifacts[0].is_file()


def test_the_preparation_phase_samples_without_a_graph(tmp_path: Path) -> None:
    seen = []

    class Sampling(FakeMethod):
        def prepare(self, context: Any) -> None:
            from finetune_core.model.interface import SampleRequest

            context.sample(SampleRequest(("a",), ("",), width=64, height=64))
            seen.append(torch.is_grad_enabled())

    model = FakeModel()
    original = model.sample

    def sample(request: Any, *args: Any) -> Any:
        seen.append(torch.is_grad_enabled())
        return original(request, *args)

    model.sample = sample  # type: ignore[method-assign]
    train(tmp_path, method=Sampling(), model=model)
    assert seen == [False, True]
