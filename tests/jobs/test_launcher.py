"""`train --num-processes N` (issue 15): checked before anything starts, launched through accelerate, a dead process
reported in one sentence. The 2-process training itself is tested in tests/train/test_distributed.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from finetune_core import cli
from finetune_core.jobs import launcher
from finetune_core.train.distributed import launched_rank, launched_world


def test_the_flag_is_taken_out_and_the_command_is_accelerate_launch():
    argv = ["train", "lora", "--name", "x", "--num-processes", "2", "--steps", "3", "--num-processes=4"]
    assert launcher.without_flag(argv) == ["train", "lora", "--name", "x", "--steps", "3"]
    command = launcher.launch_command(argv, 2, cpu=True)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[command.index("-m", 3):] == ["-m", "finetune_core", "train", "lora", "--name", "x", "--steps", "3",
                                                 "--device", "cpu"]


def test_a_bad_request_is_one_sentence_and_nothing_is_launched(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be launched for a bad request")
    monkeypatch.setattr(subprocess, "call", refuse)
    code = cli.main(["train", "textual-inversion", "--model", "tiny-sd1", "--name", "w",
                     "--data", str(tmp_path / "missing"),
                     "--output-dir", str(tmp_path / "out"), "--num-processes", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"error: the dataset folder {tmp_path / 'missing'} does not exist; check the path"]


def test_a_process_that_died_is_one_sentence_naming_the_run_to_resume(tmp_path, monkeypatch, one_image_dataset):
    run = tmp_path / "out" / "runs" / "textual_inversion" / "2026-01-01" / "w-120000"

    def died(command):
        run.mkdir(parents=True)
        (run / "request.json").write_text("{}")
        return 1
    monkeypatch.setattr(subprocess, "call", died)
    with pytest.raises(launcher.ProcessesFailed, match=f"resume it with --resume {run}$"):
        launcher.launch(["train", "textual-inversion"], 2, "cpu", tmp_path / "out" / "runs")


def test_the_launcher_status_passes_through_on_success_and_ctrl_c(monkeypatch, tmp_path):
    for status in (0, 130):
        monkeypatch.setattr(subprocess, "call", lambda command, status=status: status)
        assert launcher.launch(["train", "lora"], 2, "cpu", tmp_path) == status


def test_a_plain_process_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert (launched_rank(), launched_world()) == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert (launched_rank(), launched_world()) == (1, 2)


@pytest.mark.slow
def test_num_processes_2_trains_through_accelerate_launch(tmp_path, one_image_dataset):
    """The real thing, end to end (about 25 s on 2 busy cores): two processes, one progress bar, one result line."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "finetune_core", "train", "textual-inversion", "--name", "w",
                           "--model", "tiny-sd1",
                           "--data", str(one_image_dataset), "--template", str(one_image_dataset.parent /
                                                                                 "name_only.txt"),
                           "--width", "64", "--height", "64", "--steps", "3", "--batch-size", "1", "--preview-every",
                           "0", "--output-dir", str(out), "--num-processes", "2"],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Training finished at step 3") == 1
    assert (out / "embeddings" / "w.pt").is_file()
