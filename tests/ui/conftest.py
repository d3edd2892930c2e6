"""Fakes shared by the UI tests: a host, a service and a method registry that need no model."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from finetune_core.jobs.service import JobResult, OutputFolders


class FakeHost:
    """A Host that records what the runner and tab tell it."""

    name = "fake"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.events: list[Any] = []
        self.written: list[tuple[str, list[Path]]] = []
        self.lock = threading.Lock()
        self.model = object()

    def get_model(self) -> Any:
        return self.model

    def folders(self) -> OutputFolders:
        return OutputFolders.standalone(self.root)

    def template_dirs(self) -> list[Path]:
        return []

    def model_family(self) -> str | None:
        return None  # the fake model's family is unknown: nothing to check a request against

    def model_picker(self) -> None:
        return None

    def model_title(self) -> str:
        return "fake.safetensors [0123456789]"

    def aesthetic_folders(self) -> list[Path]:
        return [self.folders().aesthetic_embeddings]

    def default_aesthetic_clip(self) -> str:
        return ""

    def run_exclusive(self, job: Callable[[], Any]) -> Any:
        with self.lock:
            return job()

    def on_event(self, event: Any) -> None:
        self.events.append(event)

    def artifacts_written(self, kind: str, paths: list[Path]) -> None:
        self.written.append((kind, paths))

    def list_existing(self, kind: str) -> list[str]:
        return ["style.txt", "subject.txt"] if kind == "templates" else ["old-one"]


@dataclass(frozen=True)
class FakeMethodConfig:
    init_text: str = field(default="*", metadata={"label": "Initialization text", "help": "start words"})
    num_vectors: int = field(default=1, metadata={"label": "Vectors", "help": "vectors per token"})
    continue_from: str = field(default="", metadata={"label": "Continue from", "help": ""})


@dataclass(frozen=True)
class FakeCreate:
    init_text: str = field(default="*", metadata={"label": "Initialization text", "help": ""})


@dataclass(frozen=True)
class FakeSpec:
    key: str
    label: str
    config_type: type
    create_type: type | None
    output_kind: str
    description: str = ""


FAKE_METHODS = {"fake-method": FakeSpec("fake-method", "Fake Method", FakeMethodConfig, FakeCreate, "embeddings",
                                        "A method for tests.")}


def planned(request: Any) -> Any:
    """What a fake check hands the job runner in place of a Plan: the request as it will run."""
    return SimpleNamespace(request=request)


@pytest.fixture
def fake_methods() -> dict[str, FakeSpec]:
    return dict(FAKE_METHODS)


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path / "out")


def finished_result(paths: list[Path]) -> JobResult:
    return JobResult(artifacts=paths, run_dir=None, step=2, interrupted=False, message="done")
