"""Stand-in for modules/paths_internal.py. Tests point `data_path` at a temporary folder via configure()."""

from __future__ import annotations

import os

script_path = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
data_path = script_path
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
default_output_dir = os.path.join(data_path, "outputs")


def configure(root):
    """Test aid: re-root every data path under `root`."""
    global data_path, models_path, extensions_dir, default_output_dir
    data_path = str(root)
    models_path = os.path.join(data_path, "models")
    extensions_dir = os.path.join(data_path, "extensions")
    default_output_dir = os.path.join(data_path, "outputs")
