"""Shared fixtures: the built-in tiny models (built once per session, they take a few seconds each)."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from finetune_core.model.configs import load_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "dataset"


@pytest.fixture(scope="session", autouse=True)
def threads_per_worker() -> Iterator[None]:
    """Under pytest-xdist the workers share the cores: one worker per core, so each gets its share of threads
    (more would make them wait on each other)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def private_hash_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Checkpoint hashes go to a cache file of the test session, never the user's cache folder."""
    path = tmp_path_factory.mktemp("hash-cache") / "hashes.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_HASH_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def tiny_model() -> Callable[[str], object]:
    """A factory returning the (cached) built-in tiny model of a name."""
    from finetune_core.model.tiny import build_tiny
    built: dict[str, object] = {}

    def get(name: str) -> object:
        if name not in built:
            built[name] = build_tiny(name)
        return built[name]
    return get


@pytest.fixture
def one_image_dataset(tmp_path: Path) -> Path:
    """A dataset folder with one example image and a caption, plus a one-line template `[name]`."""
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(EXAMPLES / "ball-01.png", folder / "ball-01.png")
    (folder / "ball-01.txt").write_text("a ball")
    (tmp_path / "name_only.txt").write_text("a picture of [name]\n")
    return folder


def weights_checksum(model: object) -> str:
    """sha256 over every parameter and buffer of the model's modules, in a fixed order."""
    digest = hashlib.sha256()
    modules = dict(model.trainable_modules())  # type: ignore[attr-defined]
    vae = getattr(model, "vae", None)
    if vae is not None:
        modules["vae"] = vae
    for name in sorted(modules):
        for key, tensor in sorted(modules[name].state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tiny_family_modules(family: str, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Tiny diffusers/transformers modules with the real topology of `family` (the shipped configs, shrunk)."""
    from finetune_core.model.single_file import build_component

    torch.manual_seed(seed)
    return {name: build_component(name, config) for name, config in tiny_overrides(family).items()
            if name != "scheduler"}


def rest_client(out: Path) -> tuple[Any, Any, Any]:
    """(TestClient, JobRunner, StandaloneHost): the REST routes as the standalone app mounts them, on a host whose
    model must never load (every request these tests send is refused before that)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from finetune_core.hosts.job_runner import JobRunner
    from finetune_core.hosts.standalone import StandaloneHost
    from finetune_core.ui.api import mount_api

    def never(spec: str) -> Any:
        raise AssertionError("a refused request loaded the model")

    host = StandaloneHost(out, "tiny-sd1", loader=never)
    runner = JobRunner(host)
    app = FastAPI()
    mount_api(app, host, runner)
    return TestClient(app), runner, host


def tiny_overrides(family: str) -> dict[str, dict]:
    """Shipped configs shrunk to a few channels, keeping the topology the LDM key mapping depends on ."""
    unet: dict = {
        "block_out_channels": [8, 8, 16, 16],
        "norm_num_groups": 4,
        "attention_head_dim": 2,
        "cross_attention_dim": 16,
        "sample_size": 8,
    }
    if family == "sd2":
        unet["attention_head_dim"] = [2, 2, 4, 4]
    if family == "sdxl":
        unet.update(
            block_out_channels=[8, 16, 16],
            attention_head_dim=[2, 2, 4],
            transformer_layers_per_block=[1, 2, 2],
            cross_attention_dim=32,
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=16 + 6 * 4,
        )
    text = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": 64,
        "projection_dim": 16,
    }
    tiny = {
        "unet": unet,
        "vae": {"block_out_channels": [8, 8, 16, 16], "norm_num_groups": 4, "sample_size": 32},
        "text_encoder": text,
    }
    if family == "sdxl":
        tiny["text_encoder_2"] = dict(text)
    return {name: {**load_config(family, name), **values} for name, values in tiny.items()}


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The `__metadata__` strings of a `.safetensors` file ({} when it has none)."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def data_section_hash(path: str | os.PathLike[str]) -> str:
    """The WebUI's hash of a `.safetensors` LoRA without `sshs_model_hash`: sha256 of the bytes after the header."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        header = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header)
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
