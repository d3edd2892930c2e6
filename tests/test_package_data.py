"""The package data pyproject.toml lists exists: a pattern that matches no file ships nothing and hides a typo."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (3.10 has no TOML reader of its own)
ROOT = Path(__file__).resolve().parent.parent


def test_every_package_data_pattern_matches_a_file() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    data = config["tool"]["setuptools"]["package-data"]
    empty = [f"{package}: {pattern}" for package, patterns in data.items() for pattern in patterns
             if not any(p.is_file() for p in (ROOT / package.replace(".", "/")).glob(pattern))]
    assert not empty, f"package-data patterns that match no file: {empty}"
