"""End to end in a real Chromium: the standalone app trains a Textual Inversion embedding on the tiny SD1 model."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
STEPS = 6

pytestmark = pytest.mark.browser


def _skip_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; no `playwright install` needed)"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dataset(tmp_path: Path) -> Path:
    shipped = REPO / "examples" / "dataset"
    if shipped.is_dir() and any(shipped.glob("*.png")):
        return shipped
    from PIL import Image

    folder = tmp_path / "dataset"
    folder.mkdir()
    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (80, 64), colour).save(folder / f"ball-{i}.png")
        (folder / f"ball-{i}.txt").write_text(f"a {colour} ball")
    return folder


def _wait_for_server(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the app exited early:\n{process.stdout.read() if process.stdout else ''}")
        try:
            with urllib.request.urlopen(url + "finetune/v1/status", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the app did not answer on {url} within {timeout} s")


@pytest.fixture
def app_url(tmp_path: Path):
    output = tmp_path / "outputs"
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # FINETUNE_BROWSER_APP_PYTHON runs the app under another interpreter (e.g. a Gradio 3.41 venv).
    python = os.environ.get("FINETUNE_BROWSER_APP_PYTHON", sys.executable)
    process = subprocess.Popen([python, "-m", "finetune_core", "ui", "--model", "tiny-sd1", "--output-dir",
                                str(output), "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_for_server(url, process)
        yield url, output
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def _fill(page, elem_id: str, value: object) -> None:
    field = page.locator(f"#{elem_id}").locator("input[type=number], textarea, input[type=text]").first
    field.fill(str(value))
    field.press("Tab")  # commit the value (change event) before the next field


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_train_textual_inversion_in_the_browser(app_url, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, output = app_url
    slug = "finetune_textual_inversion"
    with sync_playwright() as play:
        browser = play.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 2200})
        page.goto(url)
        page.locator("[role=tab], .tab-nav button").filter(has_text="Textual Inversion").first.click()
        page.locator(f"#{slug}_output_section .label-wrap").first.click()  # folded by default
        for name, value in (("name", "ball"), ("data_dir", _dataset(tmp_path)), ("width", 64), ("height", 64),
                            ("steps", STEPS), ("preview_every", 3), ("save_every", 3), ("preview_steps", 2)):
            _fill(page, f"{slug}_{name}", value)
        page.locator(f"#{slug}_train").click()
        finished = page.locator(f"#{slug}_progress .finetune-status[data-status='finished']")
        expect(finished).to_be_visible(timeout=240_000)
        expect(finished).to_contain_text(f"{STEPS}/{STEPS}")
        assert page.locator(f"#{slug}_loss_plot circle").count() == STEPS
        expect(page.locator(f"#{slug}_gallery img").first).to_be_visible(timeout=30_000)
        result = page.locator(f"#{slug}_result .finetune-artifact").first
        expect(result).to_contain_text("ball")
        artefact = Path(result.inner_text().strip())
        page.mouse.wheel(0, 20000)  # the Train / status column stays in view at the bottom of the form
        page.wait_for_timeout(1000)
        box = page.locator(f"#{slug}_train").bounding_box()
        assert box is not None and 0 <= box["y"] <= 2200
        shot = tmp_path / "finetune-browser.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert artefact.is_file() and artefact.parent == output / "embeddings"
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(shot, artifacts / shot.name)


def _post(url: str, body: dict) -> dict:
    import json

    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_a_page_opened_after_a_finished_job_shows_it(app_url, tmp_path: Path) -> None:
    """A job trained through REST, then the page (re)loaded: it shows the finished job and its file, not the state
    the page had when it was built."""
    import json

    from playwright.sync_api import expect, sync_playwright

    url, output = app_url
    slug = "finetune_textual_inversion"
    with sync_playwright() as play:
        browser = play.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)  # built and shown before the job: "No training job yet"
        _post(url + "finetune/v1/train", {
            "method": "textual-inversion", "name": "reloaded",
            "data_settings": {"data_dir": str(_dataset(tmp_path)), "width": 64, "height": 64},
            "train_settings": {"steps": 2, "preview_every": 0, "save_every": 0}})
        deadline = time.time() + 240
        while time.time() < deadline:
            with urllib.request.urlopen(url + "finetune/v1/status", timeout=5) as response:
                status = json.loads(response.read())
            if status["status"] in ("finished", "failed"):
                break
            time.sleep(1)
        assert status["status"] == "finished", status
        page.reload()
        page.locator("[role=tab], .tab-nav button").filter(has_text="Textual Inversion").first.click()
        finished = page.locator(f"#{slug}_progress .finetune-status[data-status='finished']")
        expect(finished).to_be_visible(timeout=30_000)
        expect(finished).to_contain_text("2/2")
        expect(page.locator(f"#{slug}_result .finetune-artifact").first).to_contain_text("reloaded")
        expect(page.locator(f"#{slug}_train")).to_have_text("Train")
        browser.close()
