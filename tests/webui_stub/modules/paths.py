"""Stand-in for modules/paths.py: re-exports paths_internal (read through the module so configure() shows)."""

from __future__ import annotations

from modules import paths_internal


def __getattr__(name):
    return getattr(paths_internal, name)
