"""Training through the real scripts/finetune_tab.py on the tiny WebUI-shaped model: state, lock, interrupt,
folders and refresh calls, the loaded model unchanged afterwards, and medvram/lowvram placement."""

from __future__ import annotations

import hashlib
import threading

import pytest
import torch

from finetune_core.jobs.service import TrainRequest


def weights_checksum(sd_model) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(sd_model.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(value.dtype).encode())
        digest.update(value.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def ti_request(dataset, steps=3, name="tinyemb", method="textual-inversion", method_settings=None):
    return TrainRequest(method=method, name=name,
                        method_settings=method_settings if method_settings is not None else
                        {"init_text": "cat", "num_vectors": 2},
                        data_settings={"data_dir": str(dataset), "width": 64, "height": 64},
                        train_settings={"steps": steps, "learning_rate": "0.01", "save_every": 0, "preview_every": 0,
                                        "csv_every": 0})


class Recorder:
    """Wraps the host's on_event: per event, the shared.state fields and whether queue_lock was held."""

    def __init__(self, host, on_step=None):
        from modules import call_queue, shared

        self.rows, self.on_step = [], on_step
        inner = host.on_event

        def on_event(event):
            inner(event)
            free = call_queue.queue_lock.acquire(blocking=False)
            if free:
                call_queue.queue_lock.release()
            state = shared.state
            self.rows.append((type(event).__name__, state.job_no, state.job_count, state.textinfo, not free))
            if type(event).__name__ == "StepEvent" and self.on_step:
                self.on_step(event)

        host.on_event = on_event


def run(extension, request, on_step=None):
    runner = extension.EXTENSION.runner
    recorder = Recorder(extension.EXTENSION.host, on_step)
    runner.start(request)
    assert runner.wait(120)
    return runner.state(), recorder


def test_ti_run_updates_state_holds_the_lock_writes_and_refreshes(extension, sd1, dataset, webui, tmp_path):
    from modules import sd_hijack

    before = weights_checksum(sd1)
    state, recorder = run(extension, ti_request(dataset))
    assert state.status == "finished", (state.error, state.messages)
    steps = [r for r in recorder.rows if r[0] == "StepEvent"]
    assert [r[1] for r in steps] == [1, 2, 3] and all(r[2] == 3 for r in steps)
    assert all(r[4] for r in recorder.rows), "every event must arrive while queue_lock is held"
    assert "loss" in steps[-1][3]
    out = webui.cmd_opts.embeddings_dir + "/tinyemb.pt"
    assert [str(p) for p in state.artifacts] == [out]
    db = sd_hijack.model_hijack.embedding_db
    assert True in db.load_calls and "tinyemb" in db.word_embeddings  # visible without a restart
    assert weights_checksum(sd1) == before  # the loaded model is exactly what it was
    assert state.run_dir is not None and str(state.run_dir).startswith(str(tmp_path / "outputs" / "finetune"))


def test_webui_interrupt_stops_after_the_current_step_and_saves(extension, sd1, dataset, webui):
    state, _recorder = run(extension, ti_request(dataset, steps=50), on_step=lambda e: webui.state.interrupt())
    assert state.status == "interrupted"
    assert state.step <= 2
    assert state.artifacts and state.artifacts[0].is_file()


def test_second_train_is_refused_while_one_runs(extension, sd1, dataset):
    from finetune_core.hosts.job_runner import JobBusy

    runner = extension.EXTENSION.runner
    gate = threading.Event()
    Recorder(extension.EXTENSION.host, on_step=lambda e: gate.wait(10))
    runner.start(ti_request(dataset, steps=20))
    with pytest.raises(JobBusy):
        runner.start(ti_request(dataset, steps=2, name="other"))
    runner.interrupt()
    gate.set()
    assert runner.wait(60)


def test_previews_count_as_their_own_generation_in_the_consoles_total_progress(extension, sd1, dataset):
    """The console's "Total progress" bar totals job_count x sampling steps: a preview during training counts its
    own steps, the bar is closed after it as after any txt2img, and the step counts come back for the progress bar."""
    from modules import shared

    request = ti_request(dataset, steps=3, name="counted")
    request.train_settings.update(preview_every=1, preview_steps=4)
    counts = []
    state, _ = run(extension, request, on_step=lambda e: counts.append((shared.state.job_no, shared.state.job_count)))
    assert state.status == "finished", state.error
    assert shared.total_tqdm.totals_seen == [4, 4, 4] and shared.total_tqdm.total is None
    assert counts == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("bars", [True, False])
def test_the_webuis_console_shows_a_progress_bar_and_the_outcome(extension, sd1, dataset, monkeypatch, bars):
    import io

    from modules import shared

    console = io.StringIO()
    monkeypatch.setattr(shared, "progress_print_out", console)
    monkeypatch.setattr(shared.cmd_opts, "disable_console_progressbars", not bars, raising=False)
    state, _ = run(extension, ti_request(dataset, steps=3, name="shown"))
    assert state.status == "finished", state.error
    text = console.getvalue()
    assert ("Fine-tune: 100%" in text and "3/3" in text and "loss " in text) == bars
    assert f"Fine-tune: finished at step 3; wrote {state.artifacts[0]}" in text


def test_reload_ui_interrupts_the_job_and_the_new_tab_shows_how_it_ended(extension, sd1, dataset):
    """Reload UI runs the extension's script again: the job is told to save and stop, and the reloaded tab's runner
    is the same one, so its status shows the interrupted run and where to resume it (not a blank "idle")."""
    from modules import script_callbacks, scripts

    from tests.webui.conftest import REPO

    runner = extension.EXTENSION.runner
    stepped, gate = threading.Event(), threading.Event()
    Recorder(extension.EXTENSION.host, on_step=lambda e: (stepped.set(), gate.wait(10)))
    runner.start(ti_request(dataset, steps=20, name="reloaded"))
    assert stepped.wait(60)
    script_callbacks.script_unloaded_callback()  # Reload UI, while step 1 is being reported
    script_callbacks.clear_callbacks()
    reloaded = scripts.load_script(str(REPO / "scripts" / "finetune_tab.py"))
    gate.set()
    assert reloaded.EXTENSION.runner is runner and runner.wait(60)
    state = runner.state()
    assert state.status == "interrupted" and state.name == "reloaded" and state.artifacts
    assert any(f"interrupted at step {state.step}" in m and str(state.run_dir) in m for m in state.messages)
    assert reloaded.EXTENSION.host.interrupt_handler is not None  # WebUI Interrupt reaches the runner again


def test_hypernetwork_run_uses_loaded_hypernetworks_and_reloads(extension, sd1, dataset, webui):
    from modules import shared

    before = weights_checksum(sd1)
    seen = []
    original = list(shared.loaded_hypernetworks)
    state, _ = run(extension, ti_request(dataset, steps=2, name="tinyhn", method="hypernetwork", method_settings={}),
                   on_step=lambda e: seen.append([h.name for h in shared.loaded_hypernetworks]))
    assert state.status == "finished", (state.error, state.messages)
    # During the steps the WebUI's attention layers read exactly one hypernetwork: the one being trained.
    assert seen == [["finetune"], ["finetune"]]
    assert "reload_hypernetworks" in shared.calls and "tinyhn" in shared.hypernetworks
    assert shared.loaded_hypernetworks == original and weights_checksum(sd1) == before
    assert all(not hasattr(m, "hyper_k") for m in sd1.model.modules())
