"""The command line: flags generated from the settings, one sentence per bad input, the last line names the file."""

from __future__ import annotations

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
    assert main(["create", "textual-inversion", "--name", "blank", "--vectors", "4", "--output-dir", str(out)]) == 0
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
