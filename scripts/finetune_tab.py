"""WebUI entry of the Fine-tune extension: registers the tab, its settings and the REST routes. No training logic.

The extension root is on sys.path only while this file is imported (the WebUI's script loader), so everything
from `finetune_core` is imported here at the top; later calls find it in sys.modules.
"""

from __future__ import annotations

import logging
import os
import sys

from modules import script_callbacks, shared

EXT_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if EXT_DIR not in sys.path:  # imported some other way than by the WebUI's loader (tests, tools)
    sys.path.insert(0, EXT_DIR)

from finetune_core.hosts.webui import (
    api_auth_dependency,
    bound_reload_wait,
    keep_out_of_ui_config,
    settings_options,
    webui_extension,
)

log = logging.getLogger("finetune")
TAB_TITLE, TAB_ID = "Fine-tune", "finetune"


EXTENSION = webui_extension()  # the tab's and the REST routes' host and runner; the same after Reload UI


def on_ui_tabs():
    """The Fine-tune tab (Gradio 3.41 in the WebUI, Gradio 4 in Forge)."""
    import gradio as gr

    from finetune_core.ui.tab import build_tab

    blocks = build_tab(EXTENSION.host, gr, train_js="finetune_start_training", runner=EXTENSION.runner)
    keep_out_of_ui_config(blocks)
    return [(blocks, TAB_TITLE, TAB_ID)]


def on_ui_settings():
    """A "Fine-tune" section in the Training category of the Settings page."""
    section = ("finetune", "Fine-tune", "training")
    for key, info in shared.options_section(section, settings_options(shared.OptionInfo)).items():
        shared.opts.add_option(key, info)


def on_app_started(demo, app):
    """REST routes under /finetune/v1/, guarded by --api-auth like the WebUI's own API; Reload UI cannot hang."""
    from finetune_core.ui.api import mount_api

    mount_api(app, EXTENSION.host, EXTENSION.runner, dependencies=api_auth_dependency(shared.cmd_opts))
    bound_reload_wait(demo)


def on_script_unloaded():
    """Reload UI: nothing is patched outside a job; a running job is told to save and stop, and we say so."""
    if EXTENSION.runner.busy:
        log.warning("Fine-tune: Reload UI while a training job runs; interrupting it (it saves at the next step).")
        EXTENSION.runner.interrupt()
    EXTENSION.host.interrupt_handler = None


script_callbacks.on_ui_tabs(on_ui_tabs, name="finetune")
script_callbacks.on_ui_settings(on_ui_settings, name="finetune")
script_callbacks.on_app_started(on_app_started, name="finetune")
script_callbacks.on_script_unloaded(on_script_unloaded, name="finetune")
