"""scripts/finetune_tab.py and install.py as the WebUI runs them: registration, settings, the tab, the REST routes."""

from __future__ import annotations

import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]  # not `from conftest import`: several test folders have a conftest


def test_registers_the_four_callbacks(extension):
    from modules import script_callbacks

    for key in ("callbacks_ui_tabs", "callbacks_ui_settings", "callbacks_app_started", "callbacks_script_unloaded"):
        assert [c.name for c in script_callbacks.callback_map[key]] == ["finetune"], key


def test_settings_section_and_safe_reads(extension, webui):
    from modules import script_callbacks

    from finetune_core.hosts.webui import setting

    assert setting("finetune_refresh_after_training") is True  # before registration (as under --nowebui)
    script_callbacks.ui_settings_callback()
    info = webui.opts.data_labels["finetune_log_dir"]
    assert info.section == ("finetune", "Fine-tune") and info.category_id == "training"
    webui.opts.set("finetune_log_dir", "/tmp/ft-logs")
    assert str(extension.EXTENSION.host.folders().logs) == "/tmp/ft-logs"


def test_tab_builds_with_the_installed_gradio(extension, sd1):
    import gradio as gr
    from modules import script_callbacks

    tabs = script_callbacks.ui_tabs_callback()
    assert len(tabs) == 1
    blocks, title, elem_id = tabs[0]
    assert isinstance(blocks, gr.Blocks) and (title, elem_id) == ("Fine-tune", "finetune")
    assert blocks.finetune_runner is extension.EXTENSION.runner  # the tab and the REST routes share one runner


def _leaves(block):
    children = getattr(block, "children", None)
    if children is None:
        return [block]
    return [leaf for child in children for leaf in _leaves(child)]


def test_the_webuis_ui_config_forces_no_methods_values_on_another(extension, sd1, tmp_path):
    """The WebUI keys ui-config.json by tab and label ("finetune/Learning rate/value"): the first start saves every
    control's value, the next applies the saved value to every control of that key. Each method's form must keep
    its own defaults (LoRA's learning rate is not Textual Inversion's)."""
    from modules import script_callbacks, ui_loadsave

    config = tmp_path / "ui-config.json"
    first = ui_loadsave.UiLoadsave(str(config))
    first.add_block(script_callbacks.ui_tabs_callback()[0][0], "finetune")
    first.dump_defaults()
    blocks = script_callbacks.ui_tabs_callback()[0][0]  # the next start
    defaults = [(leaf, getattr(leaf, "value", None)) for leaf in _leaves(blocks)]
    assert sum(1 for leaf, _ in defaults if getattr(leaf, "label", None) == "Learning rate") >= 5  # one per method
    ui_loadsave.UiLoadsave(str(config)).add_block(blocks, "finetune")
    changed = [(leaf.label, value, leaf.value) for leaf, value in defaults if getattr(leaf, "value", None) != value]
    assert changed == []


def _client(extension, api_auth=None):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from modules import script_callbacks, shared

    shared.cmd_opts.api_auth = api_auth
    app = FastAPI()
    script_callbacks.app_started_callback(None, app)
    return TestClient(app)


def test_api_routes_without_auth(extension, sd1):
    client = _client(extension)
    status = client.get("/finetune/v1/status")
    assert status.status_code == 200 and status.json()["status"] == "idle"
    assert "textual-inversion" in client.get("/finetune/v1/methods").json()
    assert client.post("/finetune/v1/interrupt").status_code == 200
    bad = client.post("/finetune/v1/train", json={"method": "no-such-method", "name": "x"})
    assert bad.status_code == 400 and "no-such-method" in bad.json()["detail"]


def test_api_routes_honour_api_auth(extension, sd1):
    client = _client(extension, api_auth="alice:secret,bob:pw2")
    assert client.get("/finetune/v1/status").status_code == 401
    assert client.get("/finetune/v1/status", auth=("alice", "wrong")).status_code == 401
    assert client.get("/finetune/v1/status", auth=("alice", "secret")).status_code == 200
    assert client.get("/finetune/v1/status", auth=("bob", "pw2")).status_code == 200


def _demo_with_server(timeout=None):
    import uvicorn

    config = uvicorn.Config(app=lambda scope, receive, send: None, timeout_graceful_shutdown=timeout)
    return SimpleNamespace(server=SimpleNamespace(config=config))


def test_app_started_bounds_the_reload_wait(extension, sd1):
    """Reload UI closes Gradio 3.41's queue before the server: an event joining in between must not hang it."""
    from fastapi import FastAPI
    from modules import script_callbacks, shared

    from finetune_core.hosts.webui import RELOAD_GRACE_SECONDS

    shared.cmd_opts.api_auth = None
    demo = _demo_with_server()
    script_callbacks.app_started_callback(demo, FastAPI())
    assert demo.server.config.timeout_graceful_shutdown == RELOAD_GRACE_SECONDS


def test_bound_reload_wait_keeps_a_configured_limit_and_tolerates_no_server():
    from finetune_core.hosts.webui import bound_reload_wait

    demo = _demo_with_server(timeout=3)
    assert not bound_reload_wait(demo) and demo.server.config.timeout_graceful_shutdown == 3
    assert not bound_reload_wait(SimpleNamespace(server=None)) and not bound_reload_wait(None)
    old_uvicorn = SimpleNamespace(server=SimpleNamespace(config=SimpleNamespace()))
    assert not bound_reload_wait(old_uvicorn) and not hasattr(old_uvicorn.server.config, "timeout_graceful_shutdown")
    fresh = _demo_with_server()
    assert bound_reload_wait(fresh, 4.0) and fresh.server.config.timeout_graceful_shutdown == 4.0


def test_script_unloaded_interrupts_a_running_job_loudly(extension, caplog):
    from modules import script_callbacks

    extension.EXTENSION.runner._state.status = "running"  # a job that is running
    calls = []
    extension.EXTENSION.runner._control = type("C", (), {"interrupt": lambda self: calls.append(1)})()
    with caplog.at_level("WARNING"):
        script_callbacks.script_unloaded_callback()
    assert calls == [1] and "interrupting" in caplog.text
    extension.EXTENSION.runner._state.status = "idle"


def test_install_py_installs_nothing_the_webui_pins(capsys):
    import launch

    runpy.run_path(str(REPO / "install.py"))
    out = capsys.readouterr().out
    assert launch.pip_calls == []
    for name in ("torch", "safetensors", "Pillow", "numpy"):
        assert f"[Fine-tune] {name}: present" in out
    assert "nothing to install" in out


@pytest.mark.parametrize("kind", ["embeddings", "hypernetworks", "checkpoints", "templates"])
def test_list_existing(extension, sd1, kind, tmp_path):
    from modules import shared

    host = extension.EXTENSION.host
    (tmp_path / "textual_inversion_templates" / "mine.txt").write_text("a [name]\n")
    (tmp_path / "models" / "Stable-diffusion" / "base.safetensors").write_bytes(b"x")
    shared.refresh_checkpoints()
    names = host.list_existing(kind)
    expected = {"embeddings": [], "hypernetworks": [], "checkpoints": ["base.safetensors [0123456789]"],
                "templates": ["mine.txt"]}[kind]
    assert names == expected


def test_a_file_of_another_family_is_refused_with_the_request(extension, sd1, webui, dataset):
    """Issue 25.15: the loaded model's family is known before a job starts, so an SD2 embedding to continue on the
    SD1 model is refused by the check (a 400 over REST), not by the job after it started."""
    import torch
    from modules import shared

    from finetune_core.errors import ModelMismatchError
    from finetune_core.formats.embedding import EmbeddingFile, write_embedding
    from finetune_core.jobs.service import TrainRequest

    host, runner = extension.EXTENSION.host, extension.EXTENSION.runner
    assert host.model_family() == "sd1"
    folder = Path(shared.cmd_opts.embeddings_dir)
    write_embedding(EmbeddingFile("sd2word", {"clip_l": torch.ones(1, 1024)}, step=1), folder / "sd2word.pt")
    request = TrainRequest("textual-inversion", "fresh", {"continue_from": "sd2word"},
                           {"data_dir": str(dataset), "width": 64, "height": 64}, {"steps": 2})
    with pytest.raises(ModelMismatchError, match="made for SD2 models and the model to train on is SD1"):
        runner.start(request)
    assert runner.state().status == "idle"
