from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from finetune_core.errors import ConfigError
from finetune_core.hosts.standalone import StandaloneHost


def _fake_model(spec: str) -> SimpleNamespace:
    return SimpleNamespace(family="sd1", prediction_type="epsilon", identity=SimpleNamespace(shorthash="abc"),
                           device="cpu", spec=spec)


def test_model_loads_lazily_once_and_switches(tmp_path: Path) -> None:
    loads: list[str] = []
    host = StandaloneHost(tmp_path, "tiny-sd1", loader=lambda s: loads.append(s) or _fake_model(s))
    assert loads == [] and "loads on first use" in host.model_status()
    assert host.get_model() is host.get_model() and loads == ["tiny-sd1"]
    assert "tiny-sd2" in host.load_model("tiny-sd2") and host.get_model().spec == "tiny-sd2"
    with pytest.raises(ConfigError, match="empty"):
        host.load_model("")


def test_model_switch_is_refused_while_a_job_runs(tmp_path: Path) -> None:
    host = StandaloneHost(tmp_path, loader=_fake_model)
    inside, release = threading.Event(), threading.Event()
    worker = threading.Thread(target=host.run_exclusive, args=(lambda: (inside.set(), release.wait(5)),))
    worker.start()
    assert inside.wait(5)
    with pytest.raises(ConfigError, match="job is running"):
        host.load_model("tiny-sd2")
    release.set()
    worker.join(5)


def test_list_existing_scans_output_folders_and_templates(tmp_path: Path) -> None:
    host = StandaloneHost(tmp_path, loader=_fake_model)
    assert host.list_existing("embeddings") == []
    host.folders().embeddings.mkdir(parents=True)
    for name in ("b.pt", "a.safetensors", "notes.txt"):
        (host.folders().embeddings / name).write_bytes(b"")
    assert host.list_existing("embeddings") == ["a", "b"]
    assert "style_filewords.txt" in host.list_existing("templates")


def test_app_serves_the_ui_and_the_api(tmp_path: Path) -> None:
    from finetune_core.ui.app import build_app

    host = StandaloneHost(tmp_path, loader=_fake_model)
    _, app, runner = build_app(host)
    with TestClient(app) as client:
        assert client.get("/finetune/v1/status").json()["status"] == "idle"
        page = client.get("/")
        assert page.status_code == 200 and "finetune_poll" in page.text  # the JS is injected into <head>
    assert not runner.busy
