"""Stand-in for modules/scripts.py: basedir(), the loader that imports an extension script by file path and
registers its `Script` classes, and the `Script` / `ScriptRunner` pair txt2img and img2img run.

Kept from the real v1.10.1: `AlwaysVisible`; every `Script` subclass in a loaded module's namespace is registered;
`ScriptRunner.initialize_scripts` instantiates each, sets `is_img2img`/`tabname`/`filename` and sorts AlwaysVisible
ones into `alwayson_scripts`; `create_script_ui` calls `ui()`, records `args_from`/`args_to` into the runner's
`inputs` and collects `infotext_fields`; the hooks (`before_process`, `process`, `process_batch`, `postprocess`, ...)
call every AlwaysVisible script that overrides them with `p.script_args[args_from:args_to]`, and an exception in a
script is reported and swallowed (the generation goes on without it), as the real runner does.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from collections import namedtuple

from modules import errors

AlwaysVisible = object()
current_basedir = None
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data: list = []
scripts_txt2img = None
scripts_img2img = None


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    controls = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def elem_id(self, item_id):
        need_tabname = self.show(True) == self.show(False)
        tabkind = "img2img" if self.is_img2img else "txt2img"
        tabname = f"{tabkind}_" if need_tabname else ""
        title = "".join(c for c in self.title().lower().replace(" ", "_") if c.isalnum() or c == "_")
        return f"script_{tabname}{title}_{item_id}"


def basedir():
    return current_basedir


def load_script(path):
    """Import `path` as the WebUI does: extension dir prepended to sys.path, basedir() valid, not in sys.modules;
    its Script classes are registered."""
    global current_basedir
    ext_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    current_basedir = ext_dir
    sys.path.insert(0, ext_dir)
    try:
        spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for value in module.__dict__.values():
            if inspect.isclass(value) and issubclass(value, Script):
                scripts_data.append(ScriptClassData(value, path, ext_dir, module))
        return module
    finally:
        sys.path.remove(ext_dir)
        current_basedir = None


_HOOKS = ("before_process", "process", "before_process_batch", "process_batch", "postprocess_batch", "postprocess")


class ScriptRunner:
    def __init__(self):
        self.scripts = []
        self.selectable_scripts = []
        self.alwayson_scripts = []
        self.infotext_fields = []
        self.paste_field_names = []
        self.inputs = [None]

    def initialize_scripts(self, is_img2img):
        self.scripts.clear()
        self.alwayson_scripts.clear()
        self.selectable_scripts.clear()
        for data in scripts_data:
            script = data.script_class()
            script.filename = data.path
            script.is_txt2img = not is_img2img
            script.is_img2img = is_img2img
            script.tabname = "img2img" if is_img2img else "txt2img"
            visibility = script.show(script.is_img2img)
            if visibility == AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
                script.alwayson = True
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)

    def create_script_ui(self, script):
        script.args_from = script.args_to = len(self.inputs)
        controls = script.ui(script.is_img2img)
        script.controls = controls
        if controls is None:
            return
        script.name = script.title().lower()
        if script.infotext_fields is not None:
            self.infotext_fields += script.infotext_fields
        self.inputs += controls
        script.args_to = len(self.inputs)

    def setup_ui(self):
        """What the real setup_ui does for AlwaysVisible scripts: each one's UI in a group, then the dropdown."""
        import gradio as gr

        self.inputs = [None]
        for script in self.alwayson_scripts:
            with gr.Group() as group:
                self.create_script_ui(script)
            script.group = group
        self.inputs[0] = 0  # the "Script" dropdown's index: None selected
        return self.inputs

    def _call(self, name, p, *args, **kwargs):
        for script in self.alwayson_scripts:
            if getattr(type(script), name) is getattr(Script, name):
                continue
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                if name == "postprocess":
                    script.postprocess(p, args[0], *script_args)
                else:
                    getattr(script, name)(p, *script_args, **kwargs)
            except Exception:
                errors.report(f"Error running {name}: {script.filename}", exc_info=True)

    def run(self, p, *args):
        return None  # no selectable script chosen

    def __getattr__(self, name):
        if name in _HOOKS:
            return lambda p, *args, **kwargs: self._call(name, p, *args, **kwargs)
        raise AttributeError(name)
