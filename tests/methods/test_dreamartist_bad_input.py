"""DreamArtist's bad inputs (issue 12), each answered with one sentence by the tab's job runner, the CLI and the REST
API before any model loads, leaving every file as it was."""

from __future__ import annotations

import builtins
import hashlib
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from finetune_core.cli import main
from finetune_core.errors import FinetuneError
from finetune_core.formats.embedding import EmbeddingFile, write_embedding
from finetune_core.jobs.service import TrainRequest
from tests.conftest import EXAMPLES, rest_client


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Datasets with good and bad attention masks, pairs that do and do not fit, and a file that is no ConvNeXt."""
    root = tmp_path_factory.mktemp("world")
    for folder in ("data", "masks_wrong_size", "masks_colour"):
        (root / folder).mkdir()
        shutil.copy(EXAMPLES / "ball-01.png", root / folder / "ball-01.png")
    size = Image.open(EXAMPLES / "ball-01.png").size
    Image.new("L", (size[0] // 2, size[1]), 128).save(root / "masks_wrong_size" / "ball-01_att.png")
    Image.new("RGB", size, (255, 0, 0)).save(root / "masks_colour" / "ball-01_att.png")
    (root / "name_only.txt").write_text("a picture of [name]\n")
    embeddings = root / "out" / "embeddings"
    embeddings.mkdir(parents=True)
    write_embedding(EmbeddingFile("mixed", {"clip_l": torch.ones(3, 768)}, step=5), embeddings / "mixed.pt")
    write_embedding(EmbeddingFile("mixed-neg", {"clip_l": torch.ones(6, 1024)}, step=5), embeddings / "mixed-neg.pt")
    write_embedding(EmbeddingFile("alone", {"clip_l": torch.ones(3, 768)}, step=5), embeddings / "alone.pt")
    write_embedding(EmbeddingFile("taken-neg", {"clip_l": torch.ones(3, 768)}), embeddings / "taken-neg.pt")
    torch.save({"weight": torch.zeros(3, 3)}, root / "not_convnext.pth")
    return root


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


# (id, name, method settings, dataset folder, message)
CASES = [
    ("CFG text that does not parse", "fresh", {"cfg_scale": "2.5-3.5:torch.sqrt(rate)"}, "data",
     r"CFG scale '2.5-3.5:torch.sqrt\(rate\)' is not understood.*not evaluated"),
    ("CFG text with no number", "fresh", {"cfg_scale": "strong"}, "data", r"CFG scale 'strong' is not understood"),
    ("mask of the wrong size", "fresh", {}, "masks_wrong_size", r"ball-01_att.png is \d+x\d+ but its image"),
    ("mask in colour", "fresh", {}, "masks_colour", r"ball-01_att.png is in colour"),
    ("discriminator not a ConvNeXt", "fresh", {"discriminator_path": "{root}/not_convnext.pth"}, "data",
     r"not a ConvNeXt-Tiny state dict with 3 classes"),
    ("discriminator missing", "fresh", {"discriminator_path": "{root}/nope.pth"}, "data", r"nope.pth does not exist"),
    ("name ending in -neg", "style-neg", {}, "data", r"ends in '-neg'"),
    ("negative half exists", "taken", {}, "data", r"taken-neg.pt already exists"),
    ("halves of different widths", "fresh", {"continue_from": "mixed"}, "data",
     r"halves of the pair do not fit together"),
    ("no negative half", "fresh", {"continue_from": "alone"}, "data", r"has no negative half alone-neg"),
    ("continue from the negative", "fresh", {"continue_from": "taken-neg"}, "data", r"is a negative embedding"),
]


def _fill(settings: dict[str, Any], world: Path) -> dict[str, Any]:
    return {k: v.format(root=world) if isinstance(v, str) else v for k, v in settings.items()}


def _request(world: Path, name: str, settings: dict[str, Any], data: str) -> TrainRequest:
    return TrainRequest("dreamartist", name, _fill(settings, world),
                        {"data_dir": str(world / data), "width": 64, "height": 64,
                         "template": str(world / "name_only.txt")},
                        {"steps": 2, "preview_every": 0, "save_every": 0})


def _never(spec: str) -> Any:
    raise AssertionError("a refused request loaded the model")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_tab_refuses_before_the_job(case, world):
    from finetune_core.hosts.job_runner import JobRunner
    from finetune_core.hosts.standalone import StandaloneHost

    _, name, settings, data, message = case
    runner = JobRunner(StandaloneHost(world / "out", "tiny-sd1", loader=_never))
    before = _snapshot(world)
    with pytest.raises(FinetuneError) as caught:
        runner.start(_request(world, name, settings, data))
    assert re.search(message, str(caught.value)) and "\n" not in str(caught.value), str(caught.value)
    assert runner.state().status == "idle" and _snapshot(world) == before


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_cli_exits_2_with_one_sentence(case, world, capsys, monkeypatch):
    from finetune_core.model import tiny

    monkeypatch.setattr(tiny, "build_tiny", _never)
    _, name, settings, data, message = case
    argv = ["train", "dreamartist", "--model", "tiny-sd1", "--name", name,
            "--data", str(world / data), "--width", "64", "--height", "64",
            "--template", str(world / "name_only.txt"), "--steps", "2", "--preview-every", "0", "--save-every", "0",
            "--output-dir", str(world / "out")]
    for key, value in _fill(settings, world).items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    before = _snapshot(world)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert _snapshot(world) == before


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_rest_is_400_before_a_job(case, world):
    _, name, settings, data, message = case
    client, runner, _ = rest_client(world / "out")
    request = _request(world, name, settings, data)
    before = _snapshot(world)
    answer = client.post("/finetune/v1/train", json={
        "method": "dreamartist", "name": name, "method_settings": request.method_settings,
        "data_settings": request.data_settings, "train_settings": request.train_settings})
    detail = answer.json()["detail"]
    assert answer.status_code == 400 and re.search(message, detail) and "\n" not in detail, detail
    assert runner.state().status == "idle" and _snapshot(world) == before


def test_create_refuses_a_neg_name_and_an_existing_negative_half(world, capsys, monkeypatch):
    from finetune_core.model import tiny

    monkeypatch.setattr(tiny, "build_tiny", _never)
    before = _snapshot(world)
    for name, message in (("style-neg", "ends in '-neg'"), ("taken", "taken-neg.pt already exists")):
        code = main(["create", "dreamartist", "--model", "tiny-sd1", "--name", name,
                     "--output-dir", str(world / "out")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert _snapshot(world) == before


def test_a_missing_timm_is_one_sentence(world, monkeypatch, tmp_path):
    from finetune_core.errors import ConfigError
    from finetune_core.methods.discriminator import check_discriminator_file

    real_import = builtins.__import__

    def no_timm(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ConfigError, match="needs the Python package timm, which does not import here"):
        check_discriminator_file(world / "not_convnext.pth")
