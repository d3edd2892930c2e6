"""A user sees our lines, not the libraries': no version notices from the libraries, no packaging deprecations."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES

REPO = Path(__file__).resolve().parents[1]


def test_a_command_that_loads_a_model_prints_no_library_warnings(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "finetune_core", "lint", "--model", "tiny-sd1", "--data",
                           str(EXAMPLES), "--width", "64", "--height", "64"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and "warnings.warn" not in done.stderr, done.stderr


def test_pyproject_builds_without_deprecation_warnings(tmp_path, monkeypatch):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("setuptools < 77 reads no SPDX licence string")
    import setuptools.build_meta as backend

    shutil.copy(REPO / "pyproject.toml", tmp_path)
    shutil.copy(REPO / "README.md", tmp_path)
    (tmp_path / "finetune_core").mkdir()
    (tmp_path / "finetune_core" / "__init__.py").touch()
    (tmp_path / "meta").mkdir()
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend.prepare_metadata_for_build_wheel(str(tmp_path / "meta"))
    assert [str(w.message).splitlines()[0] for w in caught if "setuptools" in w.filename or
            "deprecat" in str(w.message).lower()] == []
