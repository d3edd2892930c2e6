"""The Fine-tune tab: one builder used by the WebUI (Gradio 3.41), Forge and the standalone app (Gradio 4)."""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping
from typing import Any

from finetune_core.errors import ConfigError
from finetune_core.hosts.host import Host, ModelPicker
from finetune_core.hosts.job_runner import JobRunner
from finetune_core.methods import METHODS
from finetune_core.ui.actions import guarded, message_html
from finetune_core.ui.aesthetic_tab import AestheticJobs, AestheticTab
from finetune_core.ui.compat import NO_API, file_path
from finetune_core.ui.method_tab import MethodTab, TabContext

log = logging.getLogger(__name__)


def build_tab(host: Host, gr: Any = None, train_js: str | None = None, runner: JobRunner | None = None,
              service: Any = None, methods: Mapping[str, Any] | None = None,
              blocks_kwargs: dict[str, Any] | None = None) -> Any:
    """Build the whole tab as a `gr.Blocks`: a sub-tab per registered method, plus the artefact inspector.

    gr: the gradio module (imported when None). train_js: name of a JS function called on Train as
    `fn(method_slug, ...inputs)` that must return the inputs with the first replaced by a WebUI task id
    ("task(...)"); the WebUI passes "finetune_start_training". runner: share one JobRunner with the REST routes.
    service / methods: stand-ins for tests (default: finetune_core.jobs.service and finetune_core.methods.METHODS).
    blocks_kwargs: extra gr.Blocks arguments (the standalone app passes title, css and head).
    """
    if gr is None:
        import gradio

        gr = gradio
    if service is None:
        from finetune_core.jobs import service
    if methods is None:
        methods = METHODS
    ctx = TabContext(gr, host, runner or JobRunner(host), service, train_js)
    with gr.Blocks(analytics_enabled=False, elem_id="finetune_tab", **(blocks_kwargs or {})) as blocks:
        picker = host.model_picker()
        if picker is not None:
            _model_row(ctx, picker)
        with gr.Tabs(elem_id="finetune_tabs"):
            for key, spec in methods.items():
                with gr.Tab(spec.label, elem_id=f"finetune_{key.replace('-', '_')}_tab"):
                    if spec.description:
                        # escaped: Markdown would take <lora:NAME:1> for an HTML tag and drop it
                        gr.Markdown(html.escape(spec.description), elem_classes=["finetune-description"])
                    MethodTab(ctx, spec).build()
            with gr.Tab("Aesthetic Gradients", elem_id="finetune_aesthetic_tab"):
                AestheticTab(gr, AestheticJobs(host, ctx.runner)).build()
            with gr.Tab("Inspect a file", elem_id="finetune_inspect_tab"):
                _inspector(ctx)
    blocks.finetune_runner = ctx.runner  # the host's REST routes must share it
    return blocks


def _model_row(ctx: TabContext, picker: ModelPicker) -> None:
    """Standalone only: pick the base model (a tiny built-in, a checkpoint file or a diffusers folder)."""
    gr = ctx.gr
    with gr.Row(elem_id="finetune_model_row"):
        path = gr.Textbox(label="Base model", value=picker.model_spec, scale=4,
                          elem_id="finetune_model_path",
                          info="tiny-sd1 / tiny-sd2 / tiny-sdxl (built-in, random weights), a .safetensors/.ckpt "
                               "checkpoint or a diffusers folder. Loaded on first use.")
        load = gr.Button("Load", elem_id="finetune_model_load", scale=1)
    status = gr.HTML(message_html(picker.model_status()),
                     elem_id="finetune_model_status")

    def on_load(spec: str) -> tuple:
        return (message_html(picker.load_model(spec.strip())),)

    load.click(fn=guarded(gr, on_load, 1, 0), inputs=[path], outputs=[status], **NO_API)


def _inspector(ctx: TabContext) -> None:
    """Say what an artefact file is: upload it, or give its path."""
    gr = ctx.gr
    gr.Markdown("Drop an embedding, hypernetwork, checkpoint or aesthetic embedding, or type its path.")
    with gr.Row():
        upload = gr.File(label="File", elem_id="finetune_inspect_file")
        path = gr.Textbox(label="Or a path on the server", elem_id="finetune_inspect_path")
    button = gr.Button("Inspect", elem_id="finetune_inspect_button")
    result = gr.HTML("", elem_id="finetune_inspect_result")

    def on_inspect(uploaded: Any, typed: str) -> tuple:
        chosen = (typed or "").strip() or file_path(uploaded)
        if not chosen:
            raise ConfigError("choose a file to inspect: drop one on the File box or type its path")
        return (message_html(ctx.service.inspect(chosen).describe()),)

    button.click(fn=guarded(gr, on_inspect, 1, 0), inputs=[upload, path], outputs=[result], **NO_API)

