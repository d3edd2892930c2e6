from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.testclient import TestClient

from finetune_core.errors import ArtifactError, ConfigError
from finetune_core.hosts.job_runner import JobRunner
from finetune_core.jobs import service
from finetune_core.jobs.service import JobResult
from finetune_core.train.events import StepEvent
from finetune_core.ui.api import mount_api
from tests.ui.conftest import planned


def _service(tmp_path: Path) -> Any:
    def create(method, name, settings, model, folders, overwrite=False):
        path = tmp_path / f"{name}.pt"
        path.write_bytes(repr(sorted(settings.items())).encode())
        return [path]

    def inspect(path):
        if not Path(path).exists():
            raise ArtifactError(f"{path} does not exist")
        return SimpleNamespace(describe=lambda: f"an embedding at {path}")

    def lint(settings, method, model):
        row = SimpleNamespace(path=Path("a.png"), size=(64, 64), caption="a ball", bucket=(64, 64), tokens=3,
                              problems=[])
        return SimpleNamespace(rows=[row], format=lambda: f"1 image in {settings.get('data_dir')}")

    def validate_create(method, name, settings, folders, overwrite=False):
        if not isinstance(overwrite, bool):
            raise ConfigError(f"overwrite must be true or false, not {overwrite!r}")

    return SimpleNamespace(create=create, inspect=inspect, lint=lint, form_defaults=lambda m: {},
                           validate_create=validate_create, request_from_json=service.request_from_json)


def _known_method(methods: dict):
    def check(request):
        if request.method not in methods:
            raise ConfigError(f"unknown method {request.method!r}")
        return planned(request)

    return check


def _client(host: Any, tmp_path: Path, methods: dict, train, dependencies=None) -> tuple[TestClient, JobRunner]:
    app = FastAPI()
    runner = JobRunner(host, train_fn=train, output_kind=lambda m: "embeddings", check=_known_method(methods))
    mount_api(app, host, runner, dependencies, service=_service(tmp_path), methods=methods)
    return TestClient(app), runner


def _gated_train(gate: threading.Event):
    def train(plan, model, on_event, control):
        gate.wait(5)
        on_event(StepEvent(1, 1, 0.5, 0.01, 0, 0.1, 0.0))
        return JobResult([Path("e.pt")], None, 1, False, "done")

    return train


def test_train_status_and_conflict(host: Any, tmp_path: Path, fake_methods: dict) -> None:
    gate = threading.Event()
    client, runner = _client(host, tmp_path, fake_methods, _gated_train(gate))
    response = client.post("/finetune/v1/train", json={"method": "fake-method", "name": "ball",
                                                       "train_settings": {"steps": 1}})
    assert response.status_code == 200 and response.json()["job_id"]
    again = client.post("/finetune/v1/train", json={"method": "fake-method", "name": "other"})
    assert again.status_code == 409 and "already running" in again.json()["detail"]
    gate.set()
    assert runner.wait(5)
    status = client.get("/finetune/v1/status").json()
    assert status["status"] == "finished" and status["losses"] == [[1, 0.5]] and status["artifacts"] == ["e.pt"]


def test_bad_requests_are_400_with_the_message(host: Any, tmp_path: Path, fake_methods: dict) -> None:
    client, _ = _client(host, tmp_path, fake_methods, _gated_train(threading.Event()))
    unknown = client.post("/finetune/v1/train", json={"method": "nope", "name": "x"})
    assert unknown.status_code == 400 and "unknown method 'nope'" in unknown.json()["detail"]
    extra = client.post("/finetune/v1/train", json={"method": "fake-method", "name": "x", "colour": 1})
    assert extra.status_code == 400 and "colour" in extra.json()["detail"]
    missing = client.post("/finetune/v1/inspect", json={"path": str(tmp_path / "none.pt")})
    assert missing.status_code == 400 and "does not exist" in missing.json()["detail"]
    assert client.post("/finetune/v1/interrupt").json() == {"interrupted": False}


def test_create_inspect_lint_and_methods(host: Any, tmp_path: Path, fake_methods: dict) -> None:
    client, _ = _client(host, tmp_path, fake_methods, _gated_train(threading.Event()))
    created = client.post("/finetune/v1/create", json={"method": "fake-method", "name": "ball"})
    assert created.status_code == 200
    path = created.json()["paths"][0]
    assert Path(path).is_file() and host.written == [("embeddings", [Path(path)])]
    assert client.post("/finetune/v1/inspect", json={"path": path}).json()["description"] == f"an embedding at {path}"
    lint = client.post("/finetune/v1/lint", json={"data_settings": {"data_dir": "d"}}).json()
    assert lint["n_images"] == 1 and lint["summary"] == "1 image in d" and lint["rows"][0]["bucket"] == [64, 64]
    methods = client.get("/finetune/v1/methods").json()
    fields = {f["name"] for f in methods["fake-method"]["sections"]["method"]}
    assert fields == {"init_text", "num_vectors", "continue_from"}
    assert {f["name"] for f in methods["fake-method"]["sections"]["data"]} >= {"data_dir", "batch_size"}


def test_dependencies_guard_every_route(host: Any, tmp_path: Path, fake_methods: dict) -> None:
    def auth(request: Request) -> None:
        if request.headers.get("x-key") != "secret":
            raise HTTPException(status_code=401, detail="no")

    client, _ = _client(host, tmp_path, fake_methods, _gated_train(threading.Event()), dependencies=[Depends(auth)])
    assert client.get("/finetune/v1/status").status_code == 401
    assert client.get("/finetune/v1/status", headers={"x-key": "secret"}).status_code == 200
    assert client.post("/finetune/v1/train", json={}).status_code == 401


def test_create_takes_method_settings_and_refuses_unknown_fields(host: Any, tmp_path: Path,
                                                                 fake_methods: dict) -> None:
    client, _ = _client(host, tmp_path, fake_methods, _gated_train(threading.Event()))
    created = client.post("/finetune/v1/create", json={"method": "fake-method", "name": "two",
                                                       "method_settings": {"num_vectors": 2}})
    assert created.status_code == 200
    assert Path(created.json()["paths"][0]).read_text() == "[('num_vectors', 2)]"
    typo = client.post("/finetune/v1/create", json={"method": "fake-method", "name": "x", "vectors": 2})
    assert typo.status_code == 400 and "vectors" in typo.json()["detail"]


def test_estimate_measures_an_architecture_and_refuses_a_size_without_a_unit(host: Any, tmp_path: Path,
                                                                            fake_methods: dict) -> None:
    client, _ = _client(host, tmp_path, fake_methods, _gated_train(threading.Event()))
    body = {"method": "textual-inversion", "model": "tiny-sd1", "data_settings": {"width": 64, "height": 64}}
    bad = client.post("/finetune/v1/estimate", json={**body, "fit": "8"})
    assert bad.status_code == 400 and "memory size '8' is not a size" in bad.json()["detail"]
    out = client.post("/finetune/v1/estimate", json={**body, "fit": "1GB"}).json()
    assert out["peak_bytes"] == sum(out["by_category"].values()) > 0
    assert out["plan"] == [] and out["plan_peak_bytes"] == out["peak_bytes"]
