"""Import rules (STYLE.md §11-12): the core imports no foreign framework at import time, every module sits in a room
that says its role, the rooms form one stack (a room imports only rooms below it), and no import circle exists.

The stack, bottom to top (`LAYERS`):

    base       errors.py, settings.py, cpu.py: exceptions, setting values and process settings, used by every room
    formats    artefact files the WebUI loads (stdlib, torch, safetensors only)
    model      the DiffusionModel interface and its backends (diffusers, the WebUI)
    data       datasets, captions, buckets, caches
    train      the loop, its step, schedules, optimizers, memory
    methods    one module per training method, and their registry
    jobs       the job API: a request and its checks (request, preflight), the run (service), N processes (launcher)
    bench      the training bench
    aesthetic  Aesthetic Gradients: create, apply, its requests, the WebUI txt2img section, its bench
    hosts      the Host protocol, the WebUI and the standalone app, the job runner, console progress
    ui         the Gradio tab and the REST routes (both hosts)
    cli        cli.py and __main__.py: the command line
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "finetune_core"
FOREIGN = ("diffusers", "transformers", "modules", "gradio", "fastapi", "open_clip", "accelerate")
LIGHT_MODULES = ["finetune_core", "finetune_core.jobs.service", "finetune_core.jobs.request", "finetune_core.cli",
                 "finetune_core.methods", "finetune_core.train", "finetune_core.data", "finetune_core.formats",
                 "finetune_core.model", "finetune_core.formats.inspect", "finetune_core.train.distributed",
                 "finetune_core.train.loop", "finetune_core.jobs.launcher", "finetune_core.hosts.job_runner",
                 "finetune_core.hosts.standalone", "finetune_core.hosts.webui", "finetune_core.aesthetic.gradients",
                 "finetune_core.aesthetic.aesthetic_service", "finetune_core.ui.api", "finetune_core.ui.tab"]
LAYERS = ["base", "formats", "model", "data", "train", "methods", "jobs", "bench", "aesthetic", "hosts", "ui", "cli"]
# The only modules at the package root: the command line, and what every room uses.
ROOT_MODULES = {"__init__.py": "base", "__main__.py": "cli", "cli.py": "cli", "cpu.py": "base", "errors.py": "base",
                "settings.py": "base"}
# The entries of our own processes (the command line, a bench run's child) import torch only after
# `cpu.prepare_process` has set OpenMP's wait policy and the allocator (torch reads them once, when it loads): they
# and what they import at module level stay free of torch, and their own imports may wait inside functions.
TORCH_FREE = ["finetune_core.cli", "finetune_core.cpu", "finetune_core.bench", "finetune_core.bench.case",
              "finetune_core.jobs.launcher"]
# Modules allowed to import the WebUI's `modules` (lazily, inside functions).
WEBUI_SIDE = {"model/webui_backend.py", "model/webui_session.py", "model/webui_sampler.py", "model/placement.py",
              "model/webui_text_hook.py", "aesthetic/webui_script.py", "hosts/webui.py"}
# The package's own imports that stay inside a function, each for a reason (file, imported module).
LATE_IMPORTS = {
    # a test replaces the function on its module; a name bound at import time would not see it
    ("aesthetic/aesthetic_service.py", "finetune_core.formats.atomic"),
    ("jobs/service.py", "finetune_core.formats.atomic"),
    ("aesthetic/bench.py", "finetune_core.model.tiny"),
    # the WebUI's txt2img section imports the aesthetic room: the built-in CLIPs' weights bring the tiny models only
    # when one is built
    ("aesthetic/tiny_clip.py", "finetune_core.model.tiny"),
    ("model/loading.py", "finetune_core.model.tiny"),
    ("model/loading.py", "finetune_core.model.single_file"),
    # `import finetune_core.model` stays the interface only: loading brings every backend and the tiny models
    ("model/__init__.py", "finetune_core.model.loading"),
    # the default of a parameter of the same name
    ("ui/tab.py", "finetune_core.jobs.service"),
    ("ui/api.py", "finetune_core.jobs.service"),
}
STDLIB = set(sys.stdlib_module_names)


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module name, where) for every import in a file: where is "top" (runs on import), "late" (inside a
    function) or "typing" (under `if TYPE_CHECKING`). `from pkg import sub` names the submodule when it is one."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, where: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            where = "late"
        elif _type_checking(node):
            where = "typing"
        if isinstance(node, ast.Import):
            found.extend((alias.name, where) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub if _module_file(sub) else node.module, where))
        for child in ast.iter_child_nodes(node):
            visit(child, where)

    visit(tree, "top")
    return found


def _module_file(name: str) -> Path | None:
    if not name.startswith("finetune_core."):
        return None
    base = PACKAGE.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return ROOT_MODULES.get(rel.name, "?") if len(rel.parts) == 1 else rel.parts[0]


def _room_of_module(name: str) -> str | None:
    """The room of an imported finetune_core module (None: not ours)."""
    if name != "finetune_core" and not name.startswith("finetune_core."):
        return None
    parts = name.split(".")
    if len(parts) == 1:
        return "base"
    if (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return ROOT_MODULES.get(f"{parts[1]}.py", "?")


def _files(sub: str = "") -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py"))


def test_importing_the_core_pulls_in_no_foreign_framework():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in LIGHT_MODULES) +
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FOREIGN!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_module_sits_in_a_room_of_the_stack():
    rooms = {path.name for path in PACKAGE.iterdir() if path.is_dir() and (path / "__init__.py").is_file()}
    assert rooms <= set(LAYERS), f"place the new room(s) {sorted(rooms - set(LAYERS))} in LAYERS"
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ROOT_MODULES)
    assert not loose, f"modules loose at the package root, move them into a room: {loose}"


def test_no_two_modules_share_a_file_name():
    names = Counter(path.name for path in _files() if path.name != "__init__.py")
    assert not [name for name, count in names.items() if count > 1], sorted(n for n, c in names.items() if c > 1)


def test_rooms_import_only_rooms_below_them():
    bad = []
    for path in _files():
        mine = LAYERS.index(_room(path))
        for name, where in _imports(path):
            room = _room_of_module(name)
            if room is not None and LAYERS.index(room) > mine:
                bad.append(f"{path.relative_to(PACKAGE)} ({_room(path)}) imports {name} ({room}, {where})")
    assert not bad, "\n".join(bad)


def test_no_import_circle_among_the_modules():
    """Module-level imports, those that run when a module is imported and those for type hints only, form no
    circle (a type-hint circle is still two modules that need each other)."""
    graph: dict[str, set[str]] = {}
    for path in _files():
        graph[_module_name(path)] = {name for name, where in _imports(path) if where in ("top", "typing")
                                     and name.startswith("finetune_core") and _module_file(name)}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target == module:
                continue
            if state.get(target) == 1:
                circles.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_process_entries_load_no_torch_before_they_set_the_process_up():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in TORCH_FREE) + "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, check=True)
    assert out.stdout.strip() == "False", "an entry module imports torch at module level"


def test_own_imports_are_at_the_top_unless_listed():
    entries = {str(_module_file(m).relative_to(PACKAGE)) for m in TORCH_FREE if _module_file(m)}
    entries |= {str(p.relative_to(PACKAGE)) for p in _files("bench")}  # a bench child imports the whole bench room
    late = {(str(path.relative_to(PACKAGE)), name) for path in _files() for name, where in _imports(path)
            if where == "late" and name.startswith("finetune_core") and str(path.relative_to(PACKAGE)) not in entries}
    unlisted = sorted(f"{file}: {name}" for file, name in late - LATE_IMPORTS)
    assert not unlisted, "move these imports to the top of the file (or list them with the reason): " + \
        "; ".join(unlisted)


@pytest.mark.parametrize("sub", ["formats", "data", "train", "methods", "jobs"])
def test_core_rooms_use_only_light_third_party_packages_at_module_level(sub):
    allowed = {"torch", "safetensors", "numpy", "PIL", "finetune_core"} | STDLIB
    bad = [f"{path.relative_to(PACKAGE)}: {name}" for path in _files(sub) for name, where in _imports(path)
           if where == "top" and name.split(".")[0] not in allowed]
    assert not bad, bad


def test_formats_import_no_framework_even_inside_functions():
    allowed = {"torch", "safetensors", "numpy", "PIL", "finetune_core"} | STDLIB
    bad = [f"{path.relative_to(PACKAGE)}: {name}" for path in _files("formats") for name, _ in _imports(path)
           if name.split(".")[0] not in allowed]
    assert not bad, bad


def test_only_the_webui_side_touches_the_webui_and_never_at_import_time():
    for path in _files():
        rel = str(path.relative_to(PACKAGE))
        for name, where in _imports(path):
            if name == "modules" or name.startswith("modules."):
                assert rel in WEBUI_SIDE, f"{rel} imports {name}"
                assert where != "top", f"{rel} imports {name} at module level"
