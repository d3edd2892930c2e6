from __future__ import annotations

from pathlib import Path

from finetune_core.hosts.job_runner import JobState
from finetune_core.ui.dataset_view import steps_arithmetic
from finetune_core.ui.panels import format_seconds, format_speed, gallery_items, loss_svg, progress_html, result_html


def test_loss_svg_draws_one_point_per_step_and_the_lr() -> None:
    losses = [(s, 1.0 / s) for s in range(1, 7)]
    svg = loss_svg(losses, [(s, 0.005) for s in range(1, 7)])
    assert svg.count("<circle") == 6 and "finetune-loss-line" in svg and "finetune-lr-line" in svg
    assert "step 6" in svg
    assert "<circle" not in loss_svg([], [])
    assert loss_svg([(1, float("nan")), (2, 0.5)], []).count("<circle") == 1


def test_progress_marks_the_owning_tab_as_running() -> None:
    state = JobState(job_id="j", method="m", name="ball", status="running", step=3, total=6,
                     losses=[(3, 0.25)], seconds_per_step=0.5, eta_seconds=1.5)
    mine, other = progress_html(state, "m"), progress_html(state, "other")
    assert "data-running='1'" in mine and "3/6" in mine and "2.00 it/s" in mine and "0.2500" in mine
    assert "data-running='0'" in other and "ball" in other
    done = JobState(job_id="j", method="m", status="finished", step=6, total=6)
    assert "data-running='0'" in progress_html(done, "m") and "6/6" in progress_html(done, "m")
    assert "No training job" in progress_html(JobState(), "m")


def test_result_lists_files_and_errors(tmp_path: Path) -> None:
    artefact = tmp_path / "ball.pt"
    artefact.write_bytes(b"x" * 2048)
    html = result_html(JobState(job_id="j", status="finished", artifacts=[artefact], run_dir=tmp_path))
    assert str(artefact) in html and "(2.0 KB)" in html and "Run folder" in html
    failed = result_html(JobState(job_id="j", status="failed", error="data_dir <empty> is missing"))
    assert "data_dir &lt;empty&gt; is missing" in failed


def test_gallery_shows_existing_previews_newest_first(tmp_path: Path) -> None:
    first, second = tmp_path / "a-3.png", tmp_path / "a-6.png"
    first.write_bytes(b"")
    second.write_bytes(b"")
    state = JobState(job_id="j", method="m", previews=[(first, 3, "p"), (second, 6, "p"), (tmp_path / "x", 9, "")])
    assert gallery_items(state, "m") == [(second, "step 6"), (first, "step 3")]
    assert gallery_items(state, "other") == []


def test_time_and_speed_words() -> None:
    assert format_seconds(3725) == "1h 02m" and format_seconds(185) == "3m 05s" and format_seconds(None) == "-"
    assert format_speed(0.25) == "4.00 it/s" and format_speed(4.0) == "4.00 s/it" and format_speed(0) == "-"


def test_steps_arithmetic_counts_accumulation() -> None:
    text = steps_arithmetic(10, 2, 2, 2, 100)
    assert text.startswith("10 images × 2 repeats × 20.00 epochs / batch 2 × accumulation 2 = 100 steps")
    assert "(5 steps per epoch)" in text
    assert "No images" in steps_arithmetic(0, 1, 1, 1, 10)


def test_only_true_lines_about_files_and_a_busy_job(tmp_path: Path) -> None:
    from finetune_core.hosts.job_runner import record_event, where_job_is
    from finetune_core.jobs.service import outcome_message
    from finetune_core.train.events import ArtifactSaved

    copy = tmp_path / "ball-3.pt"
    copy.write_bytes(b"x")
    state = JobState(job_id="j", method="m", status="running", step=3, total=6, run_dir=tmp_path)
    record_event(state, ArtifactSaved(3, (copy,), final=False))
    html = result_html(state)
    assert "No files written" not in html and "1 copy saved in the run folder" in html and "ball-3.pt" in html
    preparing = JobState(job_id="j", method="m", status="running", phase="latents 2/5")
    assert where_job_is(preparing) == "preparing latents 2/5" and "0/0" not in where_job_is(JobState(status="running"))
    message = outcome_message(0, True, [], tmp_path)
    assert "Wrote ." not in message and "Nothing was written" in message
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "checkpoint.pt").write_bytes(b"x" * 2_500_000)
    kept = outcome_message(3, False, [copy], tmp_path)
    assert "resume state, state/checkpoint.pt, 2.5 MB" in kept and "train it further" in kept
    assert "resume state" not in outcome_message(3, False, [copy], tmp_path, resumable=False)  # counters only
