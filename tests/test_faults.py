"""The six harms of issue 10, one test each (every one failed on the code before the fix), plus the faults around
them: full disks, broken run folders, stale temporary files, Ctrl-C in the CLI, a port in use."""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from finetune_core.errors import (
    ArtifactError,
    ConfigError,
    ModelMismatchError,
    NetworkError,
    OutOfMemory,
    StorageError,
)
from finetune_core.formats.embedding import EmbeddingFile, read_embedding, write_embedding
from finetune_core.formats.hypernetwork_file import write_hypernetwork
from finetune_core.jobs import service
from finetune_core.methods.hypernetwork import HypernetworkCreate, create_hypernetwork
from finetune_core.train.events import StepEvent, Warning_
from tests.conftest import rest_client


def _request(data: Path, name: str = "word", steps: int = 2, method: dict | None = None, **train) -> \
        service.TrainRequest:
    return service.TrainRequest("textual-inversion", name, {"init_text": "ball", **(method or {})},
                                {"data_dir": str(data), "width": 64, "height": 64,
                                 "template": str(data.parent / "name_only.txt")},
                                {"steps": steps, "preview_every": 0, "save_every": 0, "seed": 1, **train})


def _runs(folders: service.OutputFolders) -> list[Path]:
    return sorted(p for p in folders.logs.rglob("request.json")) if folders.logs.is_dir() else []


# --- 1. a JSON string "false" is not true -------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["false", "no", 0])
def test_overwrite_of_the_wrong_type_is_refused_and_the_file_kept(tiny_model, tmp_path, value):
    folders = service.OutputFolders.standalone(tmp_path)
    mine = folders.embeddings / "mine.pt"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"the user's own file")
    with pytest.raises(ConfigError, match="overwrite must be true or false"):
        service.create("textual-inversion", "mine", {}, tiny_model("tiny-sd1"), folders, overwrite=value)
    assert mine.read_bytes() == b"the user's own file"


def test_a_json_string_for_a_bool_setting_is_refused_over_rest(tmp_path, one_image_dataset):
    client, runner, host = rest_client(tmp_path / "out")
    mine = host.folders().embeddings / "word.pt"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"keep me")
    request = _request(one_image_dataset)
    body = {"method": "textual-inversion", "name": "word", "method_settings": request.method_settings,
            "data_settings": request.data_settings, "train_settings": request.train_settings, "overwrite": "false"}
    answer = client.post("/finetune/v1/train", json=body)
    created = client.post("/finetune/v1/create", json={"method": "textual-inversion", "name": "word",
                                                       "overwrite": "no"})
    runner.wait(30)
    assert answer.status_code == 400 and "overwrite must be true or false" in answer.json()["detail"]
    assert created.status_code == 400 and mine.read_bytes() == b"keep me"
    assert not _runs(host.folders()) and runner.state().status == "idle"


# --- 2. captions in UTF-16 ----------------------------------------------------------------------------------------

def test_a_utf16_caption_trains_as_written_and_is_named(tiny_model, one_image_dataset, tmp_path):
    (one_image_dataset / "ball-01.txt").write_bytes("a red ball".encode("utf-16"))
    (one_image_dataset.parent / "name_only.txt").write_text("[name], [filewords]")
    events: list = []
    service.train(_request(one_image_dataset, steps=1), tiny_model("tiny-sd1"),
                  service.OutputFolders.standalone(tmp_path / "out"), on_event=events.append)
    prompts = [e.prompt for e in events if isinstance(e, StepEvent)]
    assert prompts == ["word, a red ball"]
    assert any("ball-01.txt (UTF-16)" in e.message for e in events if isinstance(e, Warning_))


# --- 3. a NaN file to continue from -------------------------------------------------------------------------------

def test_an_embedding_with_nan_vectors_is_refused_by_name(tiny_model, one_image_dataset, tmp_path):
    folders = service.OutputFolders.standalone(tmp_path / "out")
    broken = write_embedding(EmbeddingFile("word", {"clip_l": torch.full((1, 768), float("nan"))}, step=3),
                             folders.embeddings / "word.pt")
    before = broken.read_bytes()
    with pytest.raises(ArtifactError, match=f"{broken}.*not numbers"):
        service.train(_request(one_image_dataset, method={"continue_from": "word"}), tiny_model("tiny-sd1"), folders)
    assert broken.read_bytes() == before and not _runs(folders)


def test_a_hypernetwork_with_infinite_weights_is_refused_by_name(tiny_model, one_image_dataset, tmp_path):
    from finetune_core.methods.hypernetwork import HypernetworkConfig, load_for_training
    file = create_hypernetwork("hn", HypernetworkCreate(sizes="768"))
    file.layers[768][0]["linear.0.weight"][0, 0] = float("inf")
    path = write_hypernetwork(file, tmp_path / "hn.pt")
    request = service.TrainRequest("hypernetwork", "other", {"continue_from": str(path)},
                                   {"data_dir": str(one_image_dataset), "width": 64, "height": 64},
                                   {"steps": 1, "preview_every": 0, "save_every": 0})
    with pytest.raises(ArtifactError, match=f"{path}.*768/0/linear.0.weight"):
        service.train(request, tiny_model("tiny-sd1"), service.OutputFolders.standalone(tmp_path / "out"))
    with pytest.raises(ArtifactError, match="not numbers"):  # the method's own read checks too
        load_for_training("other", HypernetworkConfig(continue_from=str(path)), tmp_path)


# --- 4. /create while a job trains --------------------------------------------------------------------------------

def test_create_while_a_job_trains_is_409_and_the_model_untouched(tiny_model, one_image_dataset, tmp_path):
    from finetune_core.hosts.standalone import StandaloneHost
    from finetune_core.ui.app import build_app

    host = StandaloneHost(tmp_path / "out", "tiny-sd1", loader=tiny_model)
    _, app, runner = build_app(host)
    request = _request(one_image_dataset, name="long", steps=100000)
    body = {"method": "textual-inversion", "name": "long", "method_settings": request.method_settings,
            "data_settings": request.data_settings, "train_settings": request.train_settings}
    create = {"method": "textual-inversion", "name": "made", "method_settings": {"init_text": "ball"}}
    with TestClient(app) as client:
        assert client.post("/finetune/v1/train", json=body).status_code == 200
        _wait_for(lambda: client.get("/finetune/v1/status").json()["step"] >= 2)
        during = client.post("/finetune/v1/create", json=create)
        assert client.post("/finetune/v1/interrupt").json() == {"interrupted": True}
        assert runner.wait(60)
        after = client.post("/finetune/v1/create", json=create)
    assert during.status_code == 409 and "training job" in during.json()["detail"]
    assert after.status_code == 200
    made = read_embedding(host.folders().embeddings / "made.pt")
    idle = service.create("textual-inversion", "again", {"init_text": "ball"}, tiny_model("tiny-sd1"),
                          service.OutputFolders.standalone(tmp_path / "idle"))
    assert torch.equal(made.vectors["clip_l"], read_embedding(idle[0]).vectors["clip_l"])


def _wait_for(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --- 5. killed between the final rename and the state save --------------------------------------------------------

class Killed(BaseException):
    """Stands for kill -9: no `except Exception`, so nothing runs after it that a real kill would not run either."""


def test_a_run_killed_after_its_final_rename_resumes_and_finishes(tiny_model, one_image_dataset, tmp_path,
                                                                  monkeypatch):
    from finetune_core.formats import atomic
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        if Path(dst).parent.name == "embeddings":
            raise Killed

    monkeypatch.setattr(atomic.os, "replace", replace)
    folders = service.OutputFolders.standalone(tmp_path / "out")
    with pytest.raises(Killed):
        service.train(_request(one_image_dataset, name="killed", steps=4, save_every=2), tiny_model("tiny-sd1"),
                      folders)
    monkeypatch.undo()
    (run,) = [p.parent for p in _runs(folders)]
    assert (folders.embeddings / "killed.pt").is_file()
    result = service.train(service.TrainRequest("textual-inversion", "killed", resume_run=str(run)),
                           tiny_model("tiny-sd1"), folders)
    assert result.step == 4 and read_embedding(folders.embeddings / "killed.pt").step == 4


def test_overwrite_is_honoured_on_resume(tiny_model, one_image_dataset, tmp_path):
    folders = service.OutputFolders.standalone(tmp_path / "out")

    def crash_at_3(event: object) -> None:
        if isinstance(event, StepEvent) and event.step == 3:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        service.train(_request(one_image_dataset, steps=4, save_every=2), tiny_model("tiny-sd1"), folders,
                      on_event=crash_at_3)
    (run,) = [p.parent for p in _runs(folders)]
    folders.embeddings.mkdir(parents=True)
    (folders.embeddings / "word.pt").write_bytes(b"made meanwhile")
    resume = service.TrainRequest("textual-inversion", "word", resume_run=str(run))
    with pytest.raises(ArtifactError, match="already exists"):
        service.train(resume, tiny_model("tiny-sd1"), folders)
    assert (folders.embeddings / "word.pt").read_bytes() == b"made meanwhile"
    resume.overwrite = True
    assert service.train(resume, tiny_model("tiny-sd1"), folders).step == 4
    assert read_embedding(folders.embeddings / "word.pt").step == 4


# --- 6. sizes no machine can hold ---------------------------------------------------------------------------------

def test_an_impossible_size_is_refused_with_a_sentence(tiny_model, one_image_dataset, tmp_path):
    folders = service.OutputFolders.standalone(tmp_path / "out")
    request = _request(one_image_dataset)
    request.data_settings.update(width=100000, height=100000)
    with pytest.raises(ConfigError, match="width is 100000.*64 to 4096"):
        service.train(request, tiny_model("tiny-sd1"), folders)
    assert not folders.logs.exists()


def test_a_run_beyond_the_device_memory_is_refused_before_step_1(tiny_model, one_image_dataset, tmp_path,
                                                                 monkeypatch):
    from finetune_core.train import memory
    monkeypatch.setattr(memory, "free_device_memory", lambda device: 1 << 20)  # a device with 1 MiB free
    folders = service.OutputFolders.standalone(tmp_path / "out")
    with pytest.raises(OutOfMemory, match=r"needs 0\.\d\d GiB on cpu, which has 0\.00 GiB free.*cannot fit.*smallest "
                                          r"peak reachable"):
        service.train(_request(one_image_dataset), tiny_model("tiny-sd1"), folders)
    assert not _runs(folders) and not (folders.embeddings / "word.pt").exists()


def test_running_out_of_memory_mid_run_is_one_sentence(tiny_model, one_image_dataset, tmp_path, monkeypatch):
    from finetune_core.train import loop
    real_step = loop.train_step

    def step(ctx, attempt, index):
        if index == 1:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real_step(ctx, attempt, index)

    monkeypatch.setattr(loop, "train_step", step)
    with pytest.raises(OutOfMemory, match="ran out of memory on cpu.*lower the batch size.*run folder"):
        service.train(_request(one_image_dataset, steps=3), tiny_model("tiny-sd1"),
                      service.OutputFolders.standalone(tmp_path / "out"))


# --- the faults around them ---------------------------------------------------------------------------------------

def test_a_full_disk_before_the_run_is_refused_and_leaves_nothing(one_image_dataset, tmp_path, monkeypatch):
    import shutil
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1 << 20))
    folders = service.OutputFolders.standalone(tmp_path / "out")
    with pytest.raises(StorageError, match="only 1 MiB free.*free some space"):
        service.validate_request(_request(one_image_dataset), folders)
    assert not (tmp_path / "out").exists()


def test_a_full_disk_mid_run_is_one_sentence_naming_the_run_folder(tiny_model, one_image_dataset, tmp_path,
                                                                   monkeypatch):
    from finetune_core.formats import atomic
    real_save = torch.save
    saves = []

    def save(obj, path, **kwargs):  # torch reports a full disk as a RuntimeError, not an OSError
        saves.append(Path(path).name)
        if len(saves) > 2:
            raise RuntimeError("write(): fd 3 failed with No space left on device")
        return real_save(obj, path, **kwargs)

    monkeypatch.setattr(atomic.torch, "save", save)
    folders = service.OutputFolders.standalone(tmp_path / "out")
    with pytest.raises(StorageError, match="could not write .*No space left on device.*free some space.*"
                                           "resume it with --resume"):
        service.train(_request(one_image_dataset, steps=4, save_every=1), tiny_model("tiny-sd1"), folders)
    run = _runs(folders)[0].parent
    assert (run / "request.json").stat().st_size > 0 and not list(run.rglob(".*.tmp"))


def test_a_failed_download_inside_the_job_is_a_network_sentence_not_a_file_one(tiny_model, one_image_dataset, tmp_path,
                                                                                monkeypatch):
    """urllib's URLError is an OSError: a host that downloads on first use (the WebUI's txt2img for SDXL class
    images) must not be told its output folder is at fault."""
    from urllib.error import URLError

    from finetune_core.data.dataset import ImageDataset

    def offline(self, model, on_progress=None):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(ImageDataset, "prepare", offline)
    with pytest.raises(NetworkError, match="tried to download a file and could not .*name resolution.*nothing "
                                           "was saved in the run folder"):
        service.train(_request(one_image_dataset, steps=2), tiny_model("tiny-sd1"),
                      service.OutputFolders.standalone(tmp_path / "out"))


def test_a_full_disk_when_the_run_starts_leaves_no_run_folder(tiny_model, one_image_dataset, tmp_path, monkeypatch):
    from finetune_core.formats import atomic
    real = atomic.atomic_write

    def full(path, write, overwrite=False):
        if Path(path).name == "request.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, write, overwrite)

    monkeypatch.setattr(atomic, "atomic_write", full)
    folders = service.OutputFolders.standalone(tmp_path / "out")
    with pytest.raises(StorageError, match="request.json \\(No space left on device\\)"):
        service.train(_request(one_image_dataset), tiny_model("tiny-sd1"), folders)
    assert not _runs(folders) and not list(folders.logs.rglob("word-*"))


def test_a_read_only_output_folder_and_a_file_in_the_way(one_image_dataset, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        service.validate_request(_request(one_image_dataset), service.OutputFolders.standalone(blocker))
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(StorageError, match="cannot be written \\(Permission denied\\)"):
        service.validate_request(_request(one_image_dataset), service.OutputFolders.standalone(tmp_path / "ro"))


def test_a_damaged_request_json_and_another_family_refuse_to_resume(tiny_model, one_image_dataset, tmp_path):
    folders = service.OutputFolders.standalone(tmp_path / "out")
    first = service.train(_request(one_image_dataset, steps=1), tiny_model("tiny-sd1"), folders)
    resume = service.TrainRequest("textual-inversion", "word", resume_run=str(first.run_dir))
    with pytest.raises(ModelMismatchError, match="SD1.*loaded model is SD2"):
        service.train(resume, tiny_model("tiny-sd2"), folders)
    (first.run_dir / "request.json").write_text('{"method": "textual-inversion", "name": ')
    with pytest.raises(ConfigError, match="request.json is damaged"):
        service.validate_request(resume, folders)


def test_stale_temporary_files_are_cleaned_on_the_next_run(tiny_model, one_image_dataset, tmp_path):
    folders = service.OutputFolders.standalone(tmp_path / "out")
    folders.embeddings.mkdir(parents=True)
    stale = folders.embeddings / ".word.pt.ab12cd_3.tmp"
    stale.write_bytes(b"half a file")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    fresh = folders.embeddings / ".other.pt.zz99yy_1.tmp"  # maybe another process writing right now: kept
    fresh.write_bytes(b"")
    user = folders.embeddings / ".notes.tmp"  # not one of ours
    user.write_bytes(b"")
    old_run = folders.logs / "textual_inversion" / "2024-01-01" / "killed-000000" / "state"
    old_run.mkdir(parents=True)
    (old_run / ".checkpoint.pt.zz11yy_2.tmp").write_bytes(b"half a state")
    os.utime(old_run / ".checkpoint.pt.zz11yy_2.tmp", (time.time() - 3600, time.time() - 3600))
    service.train(_request(one_image_dataset, steps=1), tiny_model("tiny-sd1"), folders)
    assert not stale.exists() and fresh.exists() and user.exists() and not list(old_run.iterdir())


def test_two_files_of_one_name_and_reserved_names_are_refused(tiny_model, one_image_dataset, tmp_path):
    folders = service.OutputFolders.standalone(tmp_path / "out")
    folders.embeddings.mkdir(parents=True)
    (folders.embeddings / "dup.safetensors").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="dup.safetensors already exists"):
        service.validate_request(_request(one_image_dataset, name="dup"), folders)
    for name, message in (("CON", "device name on Windows"), ("nul.x", "device name"),
                          ("a\tb", "control characters"), ("x" * 201, "at most 200")):
        with pytest.raises(ConfigError, match=message):
            service.validate_request(_request(one_image_dataset, name=name), folders)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_ctrl_c_in_the_cli_saves_and_names_the_run_folder(tiny_model, one_image_dataset, tmp_path, monkeypatch,
                                                         capsys, number):
    """Ctrl-C, and SIGTERM (a service manager, `docker stop`, a closing terminal) the same way: save, name the
    run folder, exit with the shell's code for the signal."""
    from finetune_core.cli import main
    monkeypatch.setattr(service, "load", lambda spec, device=None: tiny_model(spec))
    folders = service.OutputFolders.standalone(tmp_path / "out")

    def press_ctrl_c() -> None:
        _wait_for(lambda: bool(_runs(folders)) and (_runs(folders)[0].parent / "loss.csv").exists())
        os.kill(os.getpid(), number)  # what the terminal sends; the handler runs in the main thread

    handler = signal.getsignal(number)  # the default one, or SIG_IGN in a pytest-xdist worker
    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    code = main(["train", "textual-inversion", "--model", "tiny-sd1", "--name", "ctrlc",
                 "--data", str(one_image_dataset), "--template",
                 str(one_image_dataset.parent / "name_only.txt"), "--width", "64", "--height", "64", "--steps",
                 "100000", "--preview-every", "0", "--save-every", "0", "--csv-every", "1",
                 "--output-dir", str(folders.embeddings.parent)])
    presser.join(5)
    err = capsys.readouterr().err
    run = _runs(folders)[0].parent
    assert code == 128 + number and f"resume with --resume {run}" in err and "Traceback" not in err
    assert ("SIGTERM" in err) == (number == signal.SIGTERM)
    assert read_embedding(folders.embeddings / "ctrlc.pt").step > 0 and (run / "state" / "checkpoint.pt").is_file()
    assert signal.getsignal(number) is handler  # the CLI's handler is gone again


def test_the_app_on_a_port_in_use_says_so_before_printing_a_url(capsys):
    from finetune_core.ui.app import main
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert "http://" not in out and f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


@pytest.mark.parametrize("method", ["textual-inversion", "dreambooth"])
def test_a_tiny_image_is_named_in_the_run_as_lint_names_it(method, tiny_model, one_image_dataset, tmp_path):
    """Issue 25.5: a 1x1 image trained without a word."""
    from PIL import Image

    from finetune_core.train.events import Warning_

    Image.new("RGB", (1, 1), "red").save(one_image_dataset / "dot.png")
    request = _request(one_image_dataset, steps=1)
    if method == "dreambooth":
        request = service.TrainRequest("dreambooth", "db", {}, request.data_settings, request.train_settings)
    warnings: list[str] = []
    service.train(request, tiny_model("tiny-sd1"), service.OutputFolders.standalone(tmp_path / "out"),
                  on_event=lambda e: warnings.append(e.message) if isinstance(e, Warning_) else None)
    assert any("smaller than their training size" in w and "dot.png (1x1, trained at 64x64)" in w for w in warnings)
