"""The command line: flags generated from the settings, one sentence per bad input, the last line names the file."""

from __future__ import annotations

import re

import pytest

from finetune_core.cli import _section_types, _settings_from_args, build_parser, main
from tests.conftest import EXAMPLES


def test_every_setting_is_a_flag_and_aliases_exist():
    parser = build_parser()
    args = parser.parse_args(["train", "textual-inversion", "--name", "x", "--data", "d", "--lr", "0.01",
                              "--vectors", "3", "--shuffle-tags", "--no-use-alpha-weight", "--steps", "5"])
    settings = _settings_from_args(args, _section_types(args))  # typed by the one coercer, text mode
    assert settings["data"]["data_dir"] == "d" and settings["train"]["learning_rate"] == "0.01"
    assert settings["method"]["num_vectors"] == 3 and settings["data"]["shuffle_tags"] is True
    assert settings["data"]["use_alpha_weight"] is False and settings["train"]["steps"] == 5
    assert "seed" not in settings["train"]  # unset flags leave the method's defaults alone


def test_train_inspect_lint_create(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["train", "hypernetwork", "--model", "tiny-sd1", "--data", str(EXAMPLES), "--name", "hn",
                 "--sizes", "768", "--steps", "2", "--width", "64", "--height", "64", "--preview-every", "0",
                 "--save-every", "0", "--output-dir", str(out)])
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "hn.pt" in last and (out / "models" / "hypernetworks" / "hn.pt").is_file()
    assert main(["inspect", str(out / "models" / "hypernetworks" / "hn.pt")]) == 0
    assert "ypernetwork" in capsys.readouterr().out
    assert main(["lint", "--data", str(EXAMPLES), "--width", "64", "--height", "64"]) == 0
    assert "ball-01.png" in capsys.readouterr().out
    assert main(["create", "textual-inversion", "--model", "tiny-sd1", "--name", "blank", "--vectors", "4",
                 "--output-dir", str(out)]) == 0
    assert (out / "embeddings" / "blank.pt").is_file()


@pytest.mark.parametrize("argv,message", [
    (["--data", "/no/such/folder"], "does not exist"),
    (["--data", str(EXAMPLES), "--lr", "0.1:x"], "learning rate"),
    (["--data", str(EXAMPLES), "--steps", "0"], "steps"),
])
def test_bad_input_exits_2_with_one_sentence(argv, message, tmp_path, capsys):
    code = main(["train", "textual-inversion", "--model", "tiny-sd1", "--name", "x", "--output-dir",
                 str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err


def test_progress_bar_keeps_warnings_and_previews_readable():
    import io
    from pathlib import Path

    from finetune_core.hosts.console import ConsoleProgress
    from finetune_core.train.events import PreviewEvent, Started, StepEvent, Warning_

    stream = io.StringIO()
    with ConsoleProgress(stream) as progress:
        progress(Started(Path("run"), 10, 2))
        progress(StepEvent(3, 10, 0.25, 0.005, 0, 0.1, 0.7))
        progress(Warning_("rolled back to step 2"))
        progress(StepEvent(2, 10, 0.5, 0.0025, 0, 0.1, 0.8))  # after a rollback the step goes back
        progress(PreviewEvent(4, Path("run/images/x-4.png"), None, "a prompt"))
        assert progress.bar.n == 2
    lines = [line.split("\r")[-1] for line in stream.getvalue().splitlines()]
    assert "warning: rolled back to step 2" in lines and "preview at step 4: run/images/x-4.png" in lines
    assert "2/10" in stream.getvalue() and "loss 0.5000" in stream.getvalue()


def _tiny_ti(out, *extra):
    return ["train", "textual-inversion", "--model", "tiny-sd1", "--data", str(EXAMPLES), "--name", "emb",
            "--width", "64", "--height", "64", "--preview-every", "0", "--output-dir", str(out), *extra]


def test_resume_keeps_the_runs_output_folder_and_says_what_a_flag_changes(tmp_path, capsys, monkeypatch):
    import json

    out = tmp_path / "out"
    assert main(_tiny_ti(out, "--steps", "2", "--save-every", "1")) == 0
    run = next((out / "runs").rglob("request.json")).parent
    started = json.loads((run / "settings.json").read_text())
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # a resume without --output-dir must not write into ./outputs
    assert main(["train", "textual-inversion", "--model", "tiny-sd1", "--resume", str(run), "--steps", "3"]) == 0
    captured = capsys.readouterr()
    assert "note: resuming with max steps 3" in captured.err and "stops at step 3" in captured.err
    assert not (tmp_path / "outputs").exists() and (out / "embeddings" / "emb.pt").is_file()
    assert "finished at step 3" in captured.out
    assert json.loads((run / "settings.json").read_text()) == started  # what the run was started with


def test_a_finished_run_without_saves_keeps_its_resume_state_names_its_size_and_trains_further(tmp_path, capsys):
    out = tmp_path / "out"
    lora = ["train", "lora", "--model", "tiny-sd1", "--data", str(EXAMPLES), "--name", "net", "--width", "64",
            "--height", "64", "--preview-every", "0", "--save-every", "0", "--output-dir", str(out)]
    assert main([*lora, "--steps", "2"]) == 0
    run = next((out / "runs").rglob("request.json")).parent
    state = run / "state" / "checkpoint.pt"
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"resume state, state/checkpoint.pt, {state.stat().st_size / 1e6:.1f} MB" in last, last
    assert "train it further with more steps" in last
    assert main(["train", "lora", "--model", "tiny-sd1", "--resume", str(run), "--steps", "3"]) == 0
    assert "finished at step 3" in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    (["--lr", "0.5"], "learning_rate is '0.005' in this run, not '0.5'"),
    (["--name", "other"], "the name is 'emb' in this run"),
    (["--output-dir", "elsewhere"], "resume without --output-dir"),
    (["--steps", "1"], "already at step 2"),
])
def test_resume_refuses_a_flag_it_cannot_honour(extra, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_tiny_ti(out, "--steps", "2", "--save-every", "1")) == 0
    run = next((out / "runs").rglob("request.json")).parent
    capsys.readouterr()
    code = main(["train", "textual-inversion", "--model", "tiny-sd1", "--resume", str(run), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


@pytest.mark.parametrize("argv", [["train", "textual-inversion", "--name", "x", "--data", str(EXAMPLES)],
                                  ["create", "textual-inversion", "--name", "x"]])
def test_no_model_is_refused_with_what_it_may_be(argv, tmp_path, capsys):
    code = main([*argv, "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "no model given" in err and "tiny-sd1" in err and "diffusers folder" in err
    assert not any(tmp_path.iterdir())


def _help(argv, capsys):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare as one line


@pytest.mark.parametrize("method", ["textual-inversion", "hypernetwork", "dreambooth", "dreamartist", "lora"])
def test_each_methods_help_shows_its_own_defaults(method, capsys):
    from finetune_core.jobs.request import form_defaults

    text = _help(["train", method], capsys)
    defaults = form_defaults(method)
    for section, name, flag in (("train", "learning_rate", "--learning-rate"), ("train", "steps", "--steps"),
                                ("train", "save_every", "--save-every"), ("data", "template", "--template")):
        shown = re.search(re.escape(flag) + r" [A-Z_]+, .*?\(default: (.*?)\)|" + re.escape(flag) +
                          r" [A-Z_]+ .*?\(default: (.*?)\)", text.split("options:")[1])
        assert shown is not None and repr(defaults[section][name]) in shown.groups(), (flag, shown)


def test_bench_help_shows_defaults(capsys):
    text = _help(["bench"], capsys)
    assert "(default: 5)" in text and "(default: 3)" in text and "(default: tiny-sd1,tiny-sd2,tiny-sdxl)" in text


def test_create_offers_only_methods_with_a_create_step(capsys):
    text = _help(["create"], capsys)
    assert "textual-inversion" in text and "hypernetwork" in text and "dreamartist" in text
    assert "dreambooth" not in text and "lora" not in text


def test_a_run_shorter_than_csv_every_still_writes_its_loss_csv(tmp_path, capsys):
    from finetune_core.train.run_folder import RunFolder

    out = tmp_path / "out"
    assert main(_tiny_ti(out, "--steps", "3", "--save-every", "0", "--csv-every", "2")) == 0
    run = next((out / "runs").rglob("request.json")).parent
    assert [row.step for row in RunFolder(run).loss_rows()] == [2, 3]  # the last step's row at the end


def test_one_folder_name_per_method():
    from finetune_core.methods import METHODS

    assert {spec.log_folder for spec in METHODS.values()} == {key.replace("-", "_") for key in METHODS}


def test_a_dreambooth_checkpoint_of_tiny_sd1_loads_back_as_the_model(tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--data", str(EXAMPLES), "--steps", "1", "--width", "64", "--height", "64", "--preview-every", "0",
              "--output-dir", str(out)]
    assert main(["train", "dreambooth", "--model", "tiny-sd1", "--name", "db", *common]) == 0
    checkpoint = out / "models" / "Stable-diffusion" / "db.safetensors"
    assert main(["train", "textual-inversion", "--model", str(checkpoint), "--name", "on-db", *common]) == 0, \
        capsys.readouterr().err
    assert (out / "embeddings" / "on-db.pt").is_file()


def test_every_preparation_phase_shows_a_count_and_an_eta():
    import io
    import time
    from pathlib import Path

    from finetune_core.hosts.console import ConsoleProgress
    from finetune_core.hosts.job_runner import JobState, record_event
    from finetune_core.train.events import Phase, Started

    stream = io.StringIO()
    with ConsoleProgress(stream) as progress:
        for done in range(4):
            progress(Phase("class images into /data/classes", done, 3))
        progress(Phase("latents", 1, 5))
        progress(Started(Path("run"), 10, 0))
    text = stream.getvalue()
    assert "class images into /data/classes" in text and "3/3" in text and "latents" in text and "1/5" in text
    state = JobState(status="running")
    record_event(state, Phase("latents", 0, 4))
    state.phase_started = time.time() - 2.0  # two seconds for the first image
    record_event(state, Phase("latents", 1, 4))
    assert state.phase.startswith("latents 1/4, ETA ") and state.phase.endswith("6s")
