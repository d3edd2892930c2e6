"""Stand-in for the WebUI's launch.py (re-exports of modules/launch_utils.py) as install.py sees it."""

from __future__ import annotations

import importlib.metadata
import importlib.util

pip_calls: list[tuple[str, str]] = []


def is_installed(package):
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        try:
            return importlib.util.find_spec(package) is not None
        except ModuleNotFoundError:
            return False


def run_pip(command, desc=None, live=False):
    pip_calls.append((command, desc))
