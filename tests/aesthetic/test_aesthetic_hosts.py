"""Aesthetic Gradients on the standalone hosts: `aesthetic create` / `aesthetic apply` on the command line, the REST
routes and the tab's section, with the same setting names; bad input from issue 13 gets one sentence each, before
any model loads where it can be known without one, and leaves the disk as it was."""

from __future__ import annotations

import base64
import hashlib
import io
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from finetune_core.cli import main
from finetune_core.formats.aesthetic import write_aesthetic_files
from tests.aesthetic.clip_fixtures import transformers_clip
from tests.conftest import EXAMPLES, rest_client


class _Boom:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images, a folder without images, a tiny CLIP, and an output folder with embeddings of every kind."""
    root = tmp_path_factory.mktemp("aesthetic")
    (root / "images").mkdir()
    for path in sorted(EXAMPLES.glob("*.png"))[:3]:
        shutil.copy(path, root / "images" / path.name)
    (root / "words").mkdir()
    (root / "words" / "a.txt").write_text("no images here")
    transformers_clip(root / "clip")
    (root / "not-clip").mkdir()
    (root / "not-clip" / "config.json").write_text('{"model_type": "t5"}')
    (root / "not-clip" / "model.safetensors").write_bytes(b"")
    folder = root / "out" / "models" / "aesthetic_embeddings"
    generator = torch.Generator().manual_seed(0)
    for name, width in (("sd1-style", 768), ("sd2-style", 1024)):
        write_aesthetic_files(torch.randn(1, width, generator=generator),
                              torch.randn(width, width, generator=generator) * width ** -0.5, {}, folder, name)
    with open(folder / "evil.pt", "wb") as handle:
        pickle.dump(_Boom(), handle)
    return root


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def test_cli_create_then_apply(world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["aesthetic", "create", "--name", "mine", "--data", str(world / "images"),
                 "--clip-model", str(world / "clip"), "--batch-size", "2", "--output-dir", str(out),
                 "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    made = sorted(p.name for p in (out / "models" / "aesthetic_embeddings").iterdir())
    assert made == ["mine.pt", "mine.safetensors"]
    code = main(["aesthetic", "apply", "--model", "tiny-sd1", "--aesthetic-embedding", "mine", "--prompt",
                 "a ball", "--steps", "2", "--width", "64", "--height", "64", "--seed", "3", "--aesthetic-lr", "1e-3",
                 "--sampler", "Euler", "--compare", "--output-dir", str(out), "--threads", "1", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    images = sorted((out / "aesthetic").iterdir())
    assert [p.name for p in images] == ["mine-3.png", "plain-3.png"]
    styled, plain = (Image.open(p) for p in images)
    assert "Aesthetic embedding: mine, Aesthetic slerp: False" in styled.info["parameters"]
    assert "Aesthetic LR: 0.001" in styled.info["parameters"] and "Aesthetic" not in plain.info["parameters"]
    assert styled.tobytes() != plain.tobytes()


def test_cli_create_then_apply_with_the_built_in_tiny_clip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 24 item 8: Aesthetic Gradients tried on tiny-sd1 with nothing on disk but a few images."""
    from finetune_core.formats.aesthetic import read_aesthetic_sidecar

    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    generator = torch.Generator().manual_seed(5)
    for i, (size, mode) in enumerate((((40, 56), "RGB"), ((64, 48), "RGBA"), ((33, 33), "L"))):
        pixels = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).convert(mode).save(images / f"{i}.png")
    code = main(["aesthetic", "create", "--name", "tried", "--data", str(images), "--clip-model", "tiny-clip",
                 "--output-dir", str(out), "--threads", "1", "--device", "cpu"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "tiny-clip is a built-in CLIP with random weights" in printed.out
    folder = out / "models" / "aesthetic_embeddings"
    vector, projection, meta = read_aesthetic_sidecar(folder / "tried.safetensors")
    assert vector.shape == (1, 768) and projection.shape == (768, 768)  # tiny-sd1's text width, ViT-L/14's joint
    assert meta["clip_model"] == "tiny-clip" and meta["image_count"] == "3"
    apply = ["aesthetic", "apply", "--model", "tiny-sd1", "--aesthetic-embedding", "tried", "--prompt", "a ball",
             "--steps", "2", "--width", "64", "--height", "64", "--seed", "3", "--aesthetic-lr", "1e-3",
             "--sampler", "Euler", "--output-dir", str(out), "--threads", "1", "--device", "cpu"]
    code, err = main([*apply, "--compare", "--clip-model", "tiny-clip"]), capsys.readouterr().err
    assert code == 0 and "note: --clip-model is not used: " in err, err  # the copy carries the projection: said
    styled, plain = (Image.open(out / "aesthetic" / name) for name in ("tried-3.png", "plain-3.png"))
    assert styled.tobytes() != plain.tobytes()
    assert "Aesthetic embedding: tried" in styled.info["parameters"]
    # The .pt alone (as a copy made elsewhere would come) takes its text projection from the named built-in CLIP:
    # the same weights, so the same image (to a rounding step: a later generation in one process may differ by
    # one level in a pixel or two; the embedding itself moves thousands by up to 255).
    (folder / "tried.safetensors").unlink()
    code, err = main([*apply, "--clip-model", "tiny-clip"]), capsys.readouterr().err
    assert code == 0 and "not used" not in err, err
    again, first, without = (np.asarray(image, dtype=np.int16) for image in
                             (Image.open(out / "aesthetic" / "tried-3-2.png"), styled, plain))
    assert np.abs(again - first).max() <= 1 and (again != first).sum() <= 8
    assert (first != without).sum() > 1000
    capsys.readouterr()
    assert main([*apply, "--clip-model", "tiny-sd1"]) == 2  # a model's name where the CLIP's goes
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: there is no built-in CLIP called 'tiny-sd1'; the built-in ones") and "\n" not in err
    assert sorted(p.name for p in (out / "aesthetic").iterdir()) == ["plain-3.png", "tried-3-2.png", "tried-3.png"]


# (id, command-line arguments, the sentence)
CLI_CASES = [
    ("folder without images", ["create", "--name", "x", "--data", "{world}/words", "--clip-model", "{world}/clip"],
     "has no images"),
    ("CLIP missing", ["create", "--name", "x", "--data", "{world}/images", "--clip-model", "{world}/gone"],
     "there is no CLIP model at"),
    ("not a CLIP", ["create", "--name", "x", "--data", "{world}/images", "--clip-model", "{world}/not-clip"],
     "holds a t5 model, not CLIP"),
    ("no CLIP given", ["create", "--name", "x", "--data", "{world}/images"],
     "no CLIP model is set: name a local CLIP folder or open_clip file (see its help); to try things out on a tiny "
     "model, name a built-in CLIP with random weights: tiny-clip (tiny-sd1, tiny-sdxl) or tiny-clip-h (tiny-sd2)"),
    ("unknown built-in CLIP", ["create", "--name", "x", "--data", "{world}/images", "--clip-model", "tiny-clp"],
     "there is no built-in CLIP called 'tiny-clp'; the built-in ones (random weights, to try things out) are "
     "tiny-clip (for tiny-sd1 and tiny-sdxl), tiny-clip-h (for tiny-sd2)"),
    ("same name", ["create", "--name", "sd1-style", "--data", "{world}/images", "--clip-model", "{world}/clip"],
     "already exists"),
    ("steps out of range", ["apply", "--aesthetic-embedding", "sd1-style", "--aesthetic-steps", "60"],
     "aesthetic steps must be between 0 and 50, not 60"),
    ("rate out of range", ["apply", "--aesthetic-embedding", "sd1-style", "--aesthetic-lr", "5"],
     "aesthetic learning rate must be between 0 and 0.1"),
    ("weight above 1", ["apply", "--aesthetic-embedding", "sd1-style", "--aesthetic-weight", "1.2"],
     "aesthetic weight must be between 0 and 1"),
    ("code-running pickle", ["apply", "--aesthetic-embedding", "evil", "--clip-model", "{world}/clip"], "refused"),
    ("unknown embedding", ["apply", "--aesthetic-embedding", "nope"], "no aesthetic embedding 'nope'"),
    ("image far too wide", ["apply", "--aesthetic-embedding", "sd1-style", "--width", "100000"],
     "multiples of 8 from 64 to 2048"),
]


@pytest.mark.parametrize("case, args, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_gets_one_sentence_and_loads_nothing(world: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str], case: str,
                                                           args: list[str], message: str) -> None:
    from finetune_core.jobs import service

    monkeypatch.setattr(service, "load", lambda *a, **k: pytest.fail("a refused request loaded the model"))
    before = _snapshot(world)
    argv = ["aesthetic", *[a.format(world=world) for a in args], "--output-dir", str(world / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert _snapshot(world) == before


def test_cli_wrong_width_for_the_model_is_one_sentence(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["aesthetic", "apply", "--model", "tiny-sd1", "--aesthetic-embedding", "sd2-style", "--width", "64",
            "--height", "64", "--steps", "1", "--output-dir", str(world / "out"), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "text width is 1024, but this SD1 model's text encoders are 768 wide" in err
    assert len(err.splitlines()) == 1


def _png(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def test_rest_routes(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(world / "out", out)
    (out / "models" / "aesthetic_embeddings" / "evil.pt").unlink()
    client, _, host = rest_client(out)
    from finetune_core.model.tiny import build_tiny

    host._loader = lambda spec: build_tiny(spec)
    listed = client.get("/finetune/v1/aesthetic/embeddings").json()
    assert listed == {"embeddings": ["sd1-style", "sd2-style"]}
    made = client.post("/finetune/v1/aesthetic/create", json={
        "name": "api", "settings": {"data_dir": str(world / "images"), "clip_model": str(world / "clip")}})
    assert made.status_code == 200, made.text
    assert [Path(p).name for p in made.json()["paths"]] == ["api.pt", "api.safetensors"]
    applied = client.post("/finetune/v1/aesthetic/apply", json={
        "settings": {"aesthetic_embedding": "api", "aesthetic_lr": 0.001},
        "preview": {"prompt": "a ball", "steps": 2, "width": 64, "height": 64, "sampler": "Euler"}})
    assert applied.status_code == 200, applied.text
    plain, styled = (_png(text) for text in applied.json()["images"])
    assert plain.size == styled.size == (64, 64) and plain.tobytes() != styled.tobytes()
    assert "Aesthetic embedding: api" in applied.json()["infotexts"][1]


# (id, route, body, sentence)
REST_CASES = [
    ("folder without images", "create", {"name": "x", "settings": {"data_dir": "{world}/words",
                                                                  "clip_model": "{world}/clip"}}, "has no images"),
    ("CLIP missing", "create", {"name": "x", "settings": {"data_dir": "{world}/images",
                                                         "clip_model": "{world}/gone"}}, "there is no CLIP model"),
    ("unknown built-in CLIP", "create", {"name": "x", "settings": {"data_dir": "{world}/images",
                                                                  "clip_model": "tiny-clip-x"}},
     "there is no built-in CLIP called 'tiny-clip-x'"),
    ("steps out of range", "apply", {"settings": {"aesthetic_embedding": "sd1-style", "aesthetic_steps": 51}},
     "aesthetic steps must be between 0 and 50"),
    ("weight as text", "apply", {"settings": {"aesthetic_embedding": "sd1-style", "aesthetic_weight": "0.5"}},
     "must be a number"),
    ("weight below 0", "apply", {"settings": {"aesthetic_embedding": "sd1-style", "aesthetic_weight": -0.1}},
     "aesthetic weight must be between 0 and 1"),
    ("unknown setting", "apply", {"settings": {"aesthetic_strength": 1}}, "unknown aesthetic setting"),
    ("image far too wide", "apply", {"settings": {"aesthetic_embedding": "sd1-style"},
                                     "preview": {"width": 100000, "height": 64}}, "multiples of 8 from 64 to 2048"),
    ("CFG scale absurd", "apply", {"settings": {"aesthetic_embedding": "sd1-style"},
                                   "preview": {"cfg_scale": 1e9}}, "CFG scale must be between 0 and 30"),
]


def _fill(value: Any, world: Path) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, world) for k, v in value.items()}
    return value.format(world=world) if isinstance(value, str) else value


@pytest.mark.parametrize("case, route, body, message", REST_CASES, ids=[c[0] for c in REST_CASES])
def test_rest_bad_input_is_a_400_sentence(world: Path, case: str, route: str, body: dict[str, Any],
                                         message: str) -> None:
    client, _, _ = rest_client(world / "out")
    before = _snapshot(world)
    answer = client.post(f"/finetune/v1/aesthetic/{route}", json=_fill(body, world))
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["detail"] and "\n" not in answer.json()["detail"]
    assert _snapshot(world) == before


def test_the_tab_has_the_section(tmp_path: Path) -> None:
    import gradio as gr

    from finetune_core.hosts.standalone import StandaloneHost
    from finetune_core.ui.tab import build_tab

    blocks = build_tab(StandaloneHost(tmp_path, "tiny-sd1", loader=lambda spec: pytest.fail("no model load")), gr)
    ids = {getattr(block, "elem_id", None) for block in blocks.blocks.values()}
    assert {"finetune_aesthetic_tab", "finetune_aesthetic_create_button", "finetune_aesthetic_preview_button",
            "finetune_aesthetic_create_clip_model", "finetune_aesthetic_create_data_dir",
            "finetune_aesthetic_apply_aesthetic_embedding", "finetune_aesthetic_apply_aesthetic_weight",
            "finetune_aesthetic_preview_prompt"} <= ids


def test_cli_bench_prints_the_overhead_table(capsys: pytest.CaptureFixture[str]) -> None:
    """`aesthetic bench` runs on a tiny model and prints one row per model with every column filled (no figure is
    checked: speed is for the bench to report, not for a test)."""
    assert main(["aesthetic", "bench", "--models", "tiny-sd1", "--rounds", "1", "--first", "1",
                 "--aesthetic-steps", "1", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header, rows = lines[-3], [line for line in lines if line.startswith("| tiny-sd1 |")]
    assert header.startswith("| model | plain | first call") and header.endswith("| others |")
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert len(cells) == header.count("|") - 1 and all(cells)
    assert cells[-1].endswith("%") or cells[-1] == "-"  # the other processes' share ("-" off Linux)
    assert lines[0].startswith("tiny-sd1: plain ") and " cached " in lines[0]


def test_a_long_apply_never_blocks_status_or_interrupt(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While one request generates (held here until the end of the test, at most 60 s), the status and interrupt
    routes answer meanwhile: had they waited for it, it would have ended before them. No clock is read."""
    import threading
    import time

    from finetune_core.ui.aesthetic_tab import AestheticJobs

    release = threading.Event()

    def slow_preview(self: Any, settings: dict, preview: dict, from_text: bool = False) -> list:
        release.wait(60.0)
        raise AssertionError("held")

    monkeypatch.setattr(AestheticJobs, "preview", slow_preview)
    client, _, _ = rest_client(world / "out")
    worker = threading.Thread(target=lambda: client.post("/finetune/v1/aesthetic/apply", json={
        "settings": {"aesthetic_embedding": "sd1-style"}, "preview": {"width": 64, "height": 64}}))
    worker.start()
    time.sleep(0.3)
    try:
        for method, path in (("get", "status"), ("post", "interrupt"), ("get", "status")):
            answer = getattr(client, method)(f"/finetune/v1/{path}")
            assert answer.status_code == 200 and worker.is_alive()  # answered while the long request still ran
    finally:
        release.set()
        worker.join()
