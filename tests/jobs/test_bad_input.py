"""Bad input, table-driven, through the CLI and the REST API: each gets its exit code or HTTP status and one
sentence without a traceback, loads no model, and leaves every file on disk as it was."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_core.cli import main
from finetune_core.formats.embedding import EmbeddingFile, write_embedding
from tests.conftest import EXAMPLES, rest_client


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset, a template, an output folder with a user's files, a damaged run folder and a file in the way."""
    root = tmp_path_factory.mktemp("world")
    (root / "data").mkdir()
    shutil.copy(EXAMPLES / "ball-01.png", root / "data" / "ball-01.png")
    (root / "data" / "ball-01.txt").write_text("a ball")
    (root / "name_only.txt").write_text("a picture of [name]\n")
    embeddings = root / "out" / "embeddings"
    embeddings.mkdir(parents=True)
    write_embedding(EmbeddingFile("keep", {"clip_l": torch.ones(1, 768)}, step=5), embeddings / "keep.pt")
    write_embedding(EmbeddingFile("sd2word", {"clip_l": torch.ones(1, 1024)}, step=5), embeddings / "sd2word.pt")
    write_embedding(EmbeddingFile("nan", {"clip_l": torch.full((1, 768), float("nan"))}, step=5), embeddings / "nan.pt")
    (embeddings / "dup.safetensors").write_bytes(b"not even a real file")
    (embeddings / "noise.pt").write_bytes(bytes([7]) + random.Random(0).randbytes(4095))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.ones(0, 768)}, "name": "zero",
                "step": 0}, embeddings / "zero.pt")
    broken = root / "out" / "runs" / "textual_inversion" / "2024-01-01" / "broken-000000"
    broken.mkdir(parents=True)
    (broken / "request.json").write_text('{"method": "textual-inversion", "na')
    (root / "unreadable").mkdir()
    (root / "unreadable" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "not-a-run").mkdir()
    (root / "a-file").write_text("in the way")
    return root


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


# (id, train settings as (section, key, value) or top-level (None, key, value), CLI flags, message)
# CLI flags None: not expressible on the command line (its flags are typed: a --no-flag is never the text "no").
TRAIN_CASES = [
    ("zero steps", ("train", "steps", 0), ["--steps", "0"], r"\(steps\) must be more than 0"),
    ("steps as text", ("train", "steps", "ten"), ["--steps", "ten"], r"Max steps \(steps\) must be a whole number"),
    ("impossible size", ("data", "width", 100000), ["--width", "100000"], "width is 100000"),
    ("bad schedule", ("train", "learning_rate", "0.1:x"), ["--lr", "0.1:x"], "learning rate"),
    ("probability above 1", ("data", "flip_p", 2.0), ["--flip-p", "2"], "probability between 0 and 1"),
    ("unknown optimizer", ("train", "optimizer", "nope"), ["--optimizer", "nope"], "optimizer 'nope' is not known"),
    ("template without [name]", ("data", "template", "none.txt"), ["--template", "none.txt"], r"never uses \[name\]"),
    ("missing dataset", ("data", "data_dir", "/no/such/folder"), ["--data", "/no/such/folder"], "does not exist"),
    ("name with a folder", (None, "name", "../evil"), ["--name", "../evil"], "contains '/'"),
    ("windows device name", (None, "name", "CON"), ["--name", "CON"], "device name on Windows"),
    ("control character", (None, "name", "a\tb"), ["--name", "a\tb"], "control characters"),
    ("name too long", (None, "name", "x" * 201), ["--name", "x" * 201], "at most 200"),
    ("name that would change", (None, "name", "my style!"), ["--name", "my style!"],
     "has characters a file name cannot hold \\('!'\\).*e.g. 'my style'"),
    ("existing file", (None, "name", "keep"), ["--name", "keep"], "keep.pt already exists"),
    ("same name, other format", (None, "name", "dup"), ["--name", "dup"], "dup.safetensors already exists"),
    ("missing file to continue", ("method", "continue_from", "gone"), ["--continue-from", "gone"],
     "no embedding 'gone' found"),
    ("NaN file to continue", ("method", "continue_from", "nan"), ["--continue-from", "nan"], "not numbers"),
    ("file already past max steps", ("method", "continue_from", "keep"), ["--continue-from", "keep"],
     "already at step 5.*raise max steps above 5"),
    ("damaged request.json", (None, "resume_run", "{broken}"), ["--resume", "{broken}"], "request.json is damaged"),
    ("not a run folder", (None, "resume_run", "{root}/not-a-run"), ["--resume", "{root}/not-a-run"],
     "no request.json"),
    ("bool as a string", ("data", "shuffle_tags", "yes"), None, "must be true or false, not 'yes'"),
    ("overwrite as a string", (None, "overwrite", "false"), None, "overwrite must be true or false"),
    ("number for a bool", (None, "overwrite", 0), None, "overwrite must be true or false"),
    ("unknown setting", ("train", "colour", 1), None, "unknown training setting"),
    ("settings not an object", (None, "method_settings", [1]), None, "must be an object"),
    # issue 25
    ("nested-quantifier regex", ("data", "filename_word_regex", "(a+)+$"), ["--filename-word-regex", "(a+)+$"],
     "repeats a group that itself repeats"),
    ("learning rate of 0", ("train", "learning_rate", "0"), ["--lr", "0"], "has a rate of 0"),
    ("schedule steps not increasing", ("train", "learning_rate", "0.1:10, 0.05:5"), ["--lr", "0.1:10, 0.05:5"],
     "ends at step 5, not after the step 10"),
    ("schedule ending at step 0", ("train", "learning_rate", "0.1:0"), ["--lr", "0.1:0"], "ends at step 0"),
    ("optimizer not installed", ("train", "optimizer", "prodigy"), ["--optimizer", "prodigy"],
     "optimizer 'prodigy' needs a package that is not installed here; pip install prodigyopt"),
    ("file of 0 vectors to continue", ("method", "continue_from", "zero"), ["--continue-from", "zero"],
     "holds 0 vectors"),
    ("random bytes to continue from", ("method", "continue_from", "noise"), ["--continue-from", "noise"],
     "noise.pt is not a file this tool can read"),
    ("hypernetwork layer far too wide", ("method", "layer_structure", "1, 100000, 1"),
     ["--layer-structure", "1, 100000, 1"], "is too large: at most 16 layers", "hypernetwork"),
    ("activation that halves the width", ("method", "activation_func", "glu"), ["--activation-func", "glu"],
     "'glu' cannot be used in a hypernetwork", "hypernetwork"),
    ("only unreadable images", ("data", "data_dir", "{root}/unreadable"), ["--data", "{root}/unreadable"],
     "none of the 1 images in the dataset folder .*unreadable could be read: broken.png", "dreamartist"),
    ("SD2 file on an SD1 model", ("method", "continue_from", "sd2word"), ["--continue-from", "sd2word"],
     "sd2word.pt cannot be continued from: it was made for SD2 models and the model to train on is SD1"),
    ("cache folder is a file", ("data", "cache_dir", "{root}/a-file"), ["--cache-dir", "{root}/a-file"],
     "latent cache folder \\(cache_dir\\) .*a-file cannot be created because .*a-file is a file"),
]


@pytest.fixture(autouse=True)
def prodigy_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The "not installed" row holds wherever the tests run: prodigy's package is looked up under a name that
    no environment has."""
    from finetune_core.train.train_config import OPTIONAL_OPTIMIZERS

    monkeypatch.setitem(OPTIONAL_OPTIMIZERS, "prodigy", ("finetune_core_no_such_package", "Prodigy", "prodigyopt"))


def _fill(value: Any, world: Path) -> Any:
    broken = world / "out" / "runs" / "textual_inversion" / "2024-01-01" / "broken-000000"
    return value.format(broken=broken, root=world) if isinstance(value, str) else value


def _method(case: tuple) -> str:
    """The method a case trains (a fifth element; textual inversion when there is none)."""
    return case[4] if len(case) > 4 else "textual-inversion"


def _argv(world: Path, flags: list[str], method: str = "textual-inversion") -> list[str]:
    base = {"--model": "tiny-sd1", "--name": "fresh", "--data": str(world / "data"),
            "--template": str(world / "name_only.txt"),
            "--width": "64", "--height": "64", "--steps": "2", "--preview-every": "0", "--save-every": "0",
            "--output-dir": str(world / "out")}
    base.update({flags[i]: _fill(flags[i + 1], world) for i in range(0, len(flags), 2)})
    return ["train", method, *[part for pair in base.items() for part in pair]]


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model load fails the test: bad input is answered before a model loads."""
    from finetune_core.model import tiny

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a refused request loaded a model")

    monkeypatch.setattr(tiny, "build_tiny", refuse)


@pytest.mark.parametrize("case", [c for c in TRAIN_CASES if c[2] is not None], ids=lambda c: c[0])
def test_cli_bad_input_exits_2_with_one_sentence_and_changes_nothing(case, world, capsys, no_model):
    _, _, flags, message = case[:4]
    before = _snapshot(world)
    code = main(_argv(world, flags, _method(case)))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert _snapshot(world) == before


@pytest.mark.parametrize("argv,message", [
    (["create", "textual-inversion", "--name", "x", "--vectors", "0"], "between 1 and 75"),
    (["create", "textual-inversion", "--name", "keep"], "keep.pt already exists"),
    (["create", "textual-inversion", "--name", "x", "--device", "gpu0"], "not a device name"),
    (["lint", "--data", "/no/such/folder"], "does not exist"),
], ids=["create zero vectors", "create over a file", "unknown device", "lint a missing folder"])
def test_cli_create_and_lint_bad_input(argv, message, world, capsys, no_model):
    before = _snapshot(world)
    code = main([*argv, *(["--model", "tiny-sd1", "--output-dir", str(world / "out")] if argv[0] == "create" else [])])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert _snapshot(world) == before


def test_cli_zero_processes_is_refused(world, capsys, no_model):
    before = _snapshot(world)
    code = main(_argv(world, ["--num-processes", "0"]))
    err = capsys.readouterr().err
    assert code == 2 and "--num-processes must be at least 1, not 0" in err and _snapshot(world) == before


def test_cli_output_folder_that_is_a_file(world, capsys, no_model):
    before = _snapshot(world)
    code = main(_argv(world, ["--output-dir", str(world / "a-file")]))
    err = capsys.readouterr().err
    assert code == 2 and "is a file, not a folder" in err and _snapshot(world) == before


@pytest.fixture(scope="module")
def api(world: Path) -> Any:
    client, runner, _ = rest_client(world / "out")
    return client, runner


def _body(world: Path, section: str | None, key: str, value: Any, method: str = "textual-inversion") -> dict[str, Any]:
    body: dict[str, Any] = {
        "method": method, "name": "fresh", "method_settings": {},
        "data_settings": {"data_dir": str(world / "data"), "width": 64, "height": 64,
                          "template": str(world / "name_only.txt")},
        "train_settings": {"steps": 2, "preview_every": 0, "save_every": 0}}
    if section is None:
        body[key] = _fill(value, world)
    else:
        body[f"{section}_settings"][key] = _fill(value, world)
    return body


@pytest.mark.parametrize("case", TRAIN_CASES, ids=lambda c: c[0])
def test_rest_bad_train_request_is_400_before_a_job(case, world, api):
    _, (section, key, value), _, message = case[:4]
    client, runner = api
    before = _snapshot(world)
    answer = client.post("/finetune/v1/train", json=_body(world, section, key, value, _method(case)))
    detail = answer.json()["detail"]
    assert answer.status_code == 400 and "Traceback" not in detail and "\n" not in detail
    assert re.search(message, detail), detail
    assert runner.state().status == "idle" and _snapshot(world) == before


@pytest.mark.parametrize("path,raw,status,message", [
    ("train", b"{not json", 400, "not valid JSON"),
    ("train", b"[1, 2]", 400, "must be a JSON object"),
    ("train", b"", 400, "must be a JSON object"),
    ("train", json.dumps({"method": "nope", "name": "x"}).encode(), 400, "unknown method 'nope'"),
    ("train", b'{"a": "' + b"x" * (1 << 20) + b'"}', 413, "larger than"),
    ("create", json.dumps({"method": "textual-inversion", "name": "x",
                           "method_settings": {"num_vectors": 0}}).encode(), 400, "between 1 and 75"),
    ("create", json.dumps({"method": "textual-inversion", "name": "x",
                           "method_settings": {"num_vectors": "2"}}).encode(), 400, "without quotes"),
    ("create", json.dumps({"method": "textual-inversion", "name": "keep"}).encode(), 400, "already exists"),
    ("lint", json.dumps({"data_settings": {"data_dir": "/no/such", "width": "64"}}).encode(), 400, "whole number"),
    ("inspect", json.dumps({"path": 5}).encode(), 400, "non-empty string"),
    ("train", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "more than 16 levels deep"),
    ("train", b'{"method_settings": {"x": ' + b"[" * 500 + b"]" * 500 + b"}}", 400, "more than 16 levels deep"),
], ids=["malformed JSON", "a list", "empty body", "unknown method", "too large", "create zero vectors",
        "create number as text", "create over a file", "lint width as text", "inspect path not text",
        "nested 100000 deep", "nested 500 deep"])
def test_rest_bad_bodies(path, raw, status, message, world, api):
    client, runner = api
    before = _snapshot(world)
    answer = client.post(f"/finetune/v1/{path}", content=raw, headers={"content-type": "application/json"})
    detail = answer.json()["detail"]
    assert answer.status_code == status and message in detail and "Traceback" not in detail
    assert runner.state().status == "idle" and _snapshot(world) == before


@pytest.fixture(scope="module")
def tab(world: Path) -> Any:
    """A method's sub-tab actions on the standalone host (the same JobRunner and checks as the tab)."""
    from finetune_core.jobs import service
    from finetune_core.methods import METHODS
    from finetune_core.ui.actions import MethodActions
    from finetune_core.ui.method_tab import method_sections

    _, runner, host = rest_client(world / "out")

    def actions(method: str) -> MethodActions:
        spec = METHODS[method]
        return MethodActions(host, runner, service, spec.key, spec.output_kind, method_sections(spec, service))

    return actions, runner


@pytest.mark.parametrize("case", [c for c in TRAIN_CASES if c[2] is not None], ids=lambda c: c[0])
def test_tab_bad_input_is_one_sentence_before_a_job(case, world, tab):
    """What the form sends: text for numbers and text fields (the tab's own coercer), then the runner's checks."""
    from finetune_core.errors import FinetuneError

    _, (section, key, value), _, message = case[:4]
    actions, runner = tab
    body = _body(world, section, key, value, _method(case))
    values = {part: {k: v if isinstance(v, bool) else str(v) for k, v in body[f"{part}_settings"].items()}
              for part in ("method", "data", "train")}
    before = _snapshot(world)
    with pytest.raises(FinetuneError) as refused:
        actions(_method(case)).train(body["name"], values, False, body.get("resume_run") or "", None)
    assert re.search(message, str(refused.value)) and "\n" not in str(refused.value), refused.value
    assert runner.state().status == "idle" and _snapshot(world) == before
