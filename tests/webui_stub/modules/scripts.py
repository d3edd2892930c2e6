"""Stand-in for modules/scripts.py: basedir() and the loader that imports an extension script by file path."""

from __future__ import annotations

import importlib.util
import os
import sys

current_basedir = None


def basedir():
    return current_basedir


def load_script(path):
    """Import `path` as the WebUI does: extension dir prepended to sys.path, basedir() valid, not in sys.modules."""
    global current_basedir
    ext_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    current_basedir = ext_dir
    sys.path.insert(0, ext_dir)
    try:
        spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(ext_dir)
        current_basedir = None
