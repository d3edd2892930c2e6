"""Puts the WebUI stand-in (tests/webui_stub) first on sys.path for this folder's test modules only.

Each test module gets a fresh import of the stub `modules` package, and everything is removed again afterwards,
so no other test folder can see a `modules` package.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

STUB = str(Path(__file__).resolve().parent.parent / "webui_stub")
REPO = Path(__file__).resolve().parents[2]


def _forget_stub_modules() -> None:
    for name in list(sys.modules):
        if name in ("modules", "launch", "networks") or name.startswith(("modules.", "tiny_webui")):
            del sys.modules[name]


@pytest.fixture(autouse=True, scope="module")
def webui_stub_on_path():
    """The stub is importable while this folder's tests run, and only then."""
    sys.path.insert(0, STUB)
    _forget_stub_modules()
    yield
    _forget_stub_modules()
    sys.path.remove(STUB)


@pytest.fixture()
def webui(tmp_path):
    """A fresh WebUI state rooted in tmp_path (no model yet), with the built-in Lora extension's patches on, as in
    every WebUI."""
    import networks
    from modules import devices, lowvram, sd_hijack, sd_unet, shared

    shared.reset(str(tmp_path))
    # FINETUNE_WEBUI_CUDA=1 on a GPU machine: a real second device, so a misplaced tensor fails for real.
    devices.device = torch.device("cuda" if os.environ.get("FINETUNE_WEBUI_CUDA") == "1" else "cpu")
    devices.dtype = devices.dtype_unet = devices.dtype_vae = devices.dtype_inference = torch.float32
    devices.manual_cast_device = devices.fp8 = False
    sd_unet.current_unet = None
    lowvram.module_in_gpu = None
    lowvram.hook_calls.clear()
    lowvram.location.clear()
    lowvram.moves.clear()
    sd_hijack.new_model_hijack()
    networks.install()
    yield shared
    networks.uninstall()


@pytest.fixture()
def sd1(webui):
    """The tiny SD1 model, built like the WebUI loads one (after any cmd_opts the test set)."""
    import tiny_webui_model

    return tiny_webui_model.build_sd1()


@pytest.fixture()
def extension(webui):
    """scripts/finetune_tab.py imported the way the WebUI's script loader imports it (callbacks registered)."""
    from modules import script_callbacks, scripts

    from finetune_core.hosts import webui as webui_host

    webui_host._EXTENSION = None  # a WebUI process of its own: a fresh runner (it outlives Reload UI, not a restart)
    script_callbacks.clear_callbacks()
    module = scripts.load_script(str(REPO / "scripts" / "finetune_tab.py"))
    yield module
    if module.EXTENSION.runner.busy:
        module.EXTENSION.runner.interrupt()
        module.EXTENSION.runner.wait(30)


@pytest.fixture()
def dataset(tmp_path):
    """Two tiny captioned images."""
    from PIL import Image

    folder = tmp_path / "data"
    folder.mkdir()
    for i, color in enumerate([(200, 30, 30), (20, 40, 220)]):
        Image.new("RGB", (64, 64), color).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a red thing, number {i}")
    return folder
