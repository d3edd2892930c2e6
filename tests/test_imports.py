"""Import rules (STYLE.md §11-12): the core imports no foreign framework at import time, and dependencies point
one way: hosts -> ui -> service -> methods -> train -> (model, data) -> formats."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "finetune_core"
FOREIGN = ("diffusers", "transformers", "modules", "gradio", "fastapi", "open_clip", "accelerate")
LIGHT_MODULES = ["finetune_core", "finetune_core.jobs.service", "finetune_core.cli", "finetune_core.methods",
                 "finetune_core.train", "finetune_core.data", "finetune_core.formats", "finetune_core.model",
                 "finetune_core.formats.inspect", "finetune_core.train.distributed", "finetune_core.train.loop",
                 "finetune_core.jobs.launcher"]
# Modules allowed to import the WebUI's `modules` (lazily, inside functions).
WEBUI_SIDE = {"model/webui_backend.py", "model/webui_session.py", "model/webui_sampler.py", "model/placement.py",
              "model/webui_text_hook.py", "aesthetic/webui_script.py",
              "hosts/webui.py"}
STDLIB = set(sys.stdlib_module_names)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module name, at module level?) for every import in a file; relative imports are resolved."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, id(node) in top_level))
    return found


def _files(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py"))


def test_importing_the_core_pulls_in_no_foreign_framework():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in LIGHT_MODULES) +
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FOREIGN!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("sub,forbidden", [
    ("formats", ("finetune_core.model", "finetune_core.data", "finetune_core.train", "finetune_core.methods",
                 "finetune_core.ui", "finetune_core.jobs.service")),
    ("data", ("finetune_core.train", "finetune_core.methods", "finetune_core.ui", "finetune_core.jobs.service")),
    ("train", ("finetune_core.methods", "finetune_core.ui", "finetune_core.jobs.service", "finetune_core.cli")),
    ("model", ("finetune_core.methods", "finetune_core.train", "finetune_core.ui", "finetune_core.jobs.service")),
    ("methods", ("finetune_core.ui", "finetune_core.jobs.service", "finetune_core.cli")),
])
def test_dependencies_point_one_way(sub, forbidden):
    bad = [f"{path.relative_to(PACKAGE)} imports {name}" for path in _files(sub) for name, _ in _imports(path)
           if name.startswith(forbidden)]
    assert not bad, bad


def test_core_subpackages_use_only_light_third_party_packages_at_module_level():
    allowed = {"torch", "safetensors", "numpy", "PIL", "finetune_core"} | STDLIB
    bad = []
    for sub in ("formats", "data", "train", "methods"):
        for path in _files(sub):
            bad += [f"{path.relative_to(PACKAGE)}: {name}" for name, top in _imports(path)
                    if top and name.split(".")[0] not in allowed]
    assert not bad, bad


def test_only_the_webui_side_touches_the_webui_and_never_at_import_time():
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        for name, top in _imports(path):
            if name == "modules" or name.startswith("modules."):
                assert rel in WEBUI_SIDE, f"{rel} imports {name}"
                assert not top, f"{rel} imports {name} at module level"
