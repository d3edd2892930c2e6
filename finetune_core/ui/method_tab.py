"""One method's sub-tab: settings sections built from its dataclasses, the buttons, and the live status panel."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finetune_core.data.dataset_config import DatasetConfig
from finetune_core.hosts.host import Host
from finetune_core.hosts.job_runner import JobRunner
from finetune_core.train.train_config import TrainConfig
from finetune_core.ui import pick_step
from finetune_core.ui.actions import SECTIONS, MethodActions, Values
from finetune_core.ui.compat import gallery_value
from finetune_core.ui.forms import build_section, refresh_button
from finetune_core.ui.method_events import wire
from finetune_core.ui.panels import checkpoint_line
from finetune_core.ui.schema import FieldSpec, field_specs, with_advanced, with_defaults

log = logging.getLogger(__name__)

# Used only while the settings dataclasses carry no "advanced" metadata of their own.
DATA_ADVANCED = {"flip_p", "shuffle_tags", "tag_dropout", "keep_tags", "latent_sampling", "recursive",
                 "use_alpha_weight", "keep_pixels", "filename_word_regex", "filename_join_string", "cache_dir",
                 "crop_seed", "resize_mode", "crop", "attention_masks", "validation_dir", "validation_split"}
TRAIN_ADVANCED = {"weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "momentum", "min_snr_gamma",
                  "noise_offset", "nan_guard_bad_steps", "nan_guard_max_rollbacks", "nan_guard_snapshot_every",
                  "nan_guard_lr_factor", "csv_every", "save_optimizer_state", "clip_grad_value"}
OUTPUT_PREFIXES = ("preview_", "save_")  # TrainConfig fields shown under "Output & previews"
KEPT_OPEN = ("learning_rate", "steps")  # TrainConfig fields shown outside the folded Training section


@dataclass
class TabContext:
    """What every sub-tab shares: Gradio, the host, the one job runner and the service functions."""

    gr: Any
    host: Host
    runner: JobRunner
    service: Any
    train_js: str | None = None


def method_slug(key: str) -> str:
    """The method key as used in elem_ids: 'textual-inversion' -> 'textual_inversion'."""
    return key.replace("-", "_")


def method_sections(spec: Any, service: Any) -> dict[str, list[FieldSpec]]:
    """The FieldSpecs of a method's three settings dataclasses, with the method's default overrides applied."""
    defaults = service.form_defaults(spec.key) if hasattr(service, "form_defaults") else {}
    return {"method": with_defaults(field_specs(spec.config_type), defaults.get("method")),
            "data": with_advanced(with_defaults(field_specs(DatasetConfig), defaults.get("data")), DATA_ADVANCED),
            "train": with_advanced(with_defaults(field_specs(TrainConfig), defaults.get("train")), TRAIN_ADVANCED)}


class MethodTab:
    """Builds and wires one method's sub-tab inside the current Gradio Blocks context."""

    def __init__(self, ctx: TabContext, spec: Any) -> None:
        self.ctx, self.spec, self.gr = ctx, spec, ctx.gr
        self.slug = method_slug(spec.key)
        self.sections = method_sections(spec, ctx.service)
        self.create_specs = field_specs(spec.create_type) if spec.create_type is not None else []
        self.actions = MethodActions(ctx.host, ctx.runner, ctx.service, spec.key, spec.output_kind, self.sections)
        self.fields: list[tuple[str, str, Any]] = []  # (section, field name, component), the order inputs use
        self.c: dict[str, Any] = {}  # named components

    def eid(self, name: str) -> str:
        return f"finetune_{self.slug}_{name}"

    # --- layout -------------------------------------------------------------------------------------------
    def build(self) -> None:
        gr = self.gr
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, elem_classes=["finetune-form"]):  # compact (style.css)
                self._settings_column()
            with gr.Column(scale=2, elem_classes=["finetune-output-column"]):  # kept in view (style.css)
                self._output_column()
        self._wire()

    def _settings_column(self) -> None:
        gr, host = self.gr, self.ctx.host
        with gr.Row():
            self.c["name"] = gr.Textbox(label="Name", elem_id=self.eid("name"), scale=3,
                                        info=getattr(self.spec, "name_help", "The file name of the artefact."))
            self.c["overwrite"] = gr.Checkbox(label="Overwrite an existing file", value=False,
                                              elem_id=self.eid("overwrite"))
        if self.create_specs:
            self._create_section()
        with gr.Accordion("Dataset", open=True, elem_id=self.eid("dataset_section")):
            self._add("data", self.sections["data"], {"template": lambda: host.list_existing("templates")})
            with gr.Row():
                self.c["lint"] = gr.Button("Check dataset / preview crops", elem_id=self.eid("lint"))
            self.c["arithmetic"] = gr.Markdown("", elem_id=self.eid("arithmetic"))
            self.c["lint_html"] = gr.HTML("", elem_id=self.eid("lint_table"))
        with gr.Accordion(f"{self.spec.label} settings", open=True, elem_id=self.eid("method_section")):
            self._add("method", self.sections["method"],
                      {"continue_from": lambda: [""] + host.list_existing(self.spec.output_kind)})
        train = self.sections["train"]
        with gr.Row():  # the training settings people change most stay open; the rest is folded
            self._add("train", [s for s in train if s.name in KEPT_OPEN], {})
        with gr.Accordion("Training", open=False, elem_id=self.eid("train_section")):
            self._add("train", [s for s in train if not s.name.startswith(OUTPUT_PREFIXES) and
                                s.name not in KEPT_OPEN], {})
        with gr.Accordion("Output & previews", open=False, elem_id=self.eid("output_section")):
            self._add("train", [s for s in train if s.name.startswith(OUTPUT_PREFIXES)], {})
        self._presets_section()
        with gr.Accordion("Resume a run", open=False, elem_id=self.eid("resume_section")):
            self.c["resume_run"] = gr.Textbox(label="Run folder", elem_id=self.eid("resume_run"),
                                              info="A run folder written by an earlier job (see the result panel); "
                                                   "Train continues it exactly where it stopped, with the run's own "
                                                   "name, settings and output folder (the form above is not used).")

    def _add(self, section: str, specs: list[FieldSpec], dynamic: dict[str, Callable[[], list[str]]]) -> None:
        taken = {name for _, name, _ in self.fields} | {"name", "overwrite", "resume_run"}
        plain = [s for s in specs if s.name not in taken]
        clashing = [s for s in specs if s.name in taken]
        made = build_section(self.gr, plain, f"finetune_{self.slug}", dynamic)
        made.update(build_section(self.gr, clashing, f"finetune_{self.slug}_{section}", dynamic))
        self.fields += [(section, s.name, made[s.name]) for s in specs]

    def _create_section(self) -> None:
        gr = self.gr
        with gr.Accordion("Create a new, untrained file", open=False, elem_id=self.eid("create_section")):
            self.c["create_fields"] = build_section(gr, self.create_specs, self.eid("create"))
            self.c["create"] = gr.Button(f"Create {self.spec.label.lower()}", elem_id=self.eid("create"))
            self.c["create_message"] = gr.HTML("", elem_id=self.eid("create_message"))

    def _presets_section(self) -> None:
        gr = self.gr
        with gr.Accordion("Presets", open=False, elem_id=self.eid("presets_section")):
            with gr.Row(elem_classes=["finetune-refresh-row"]):
                self.c["preset"] = gr.Dropdown(label="Preset", choices=self.actions.list_presets(),
                                               allow_custom_value=True, elem_id=self.eid("preset"))
                refresh_button(gr, self.c["preset"], self.actions.list_presets, self.eid("preset_refresh"))
            with gr.Row():
                self.c["preset_save"] = gr.Button("Save settings as preset", elem_id=self.eid("preset_save"))
                self.c["preset_load"] = gr.Button("Load preset", elem_id=self.eid("preset_load"))
            self.c["preset_message"] = gr.HTML("", elem_id=self.eid("preset_message"))

    def _output_column(self) -> None:
        gr = self.gr
        with gr.Row():
            self.c["train"] = gr.Button("Train", variant="primary", elem_id=self.eid("train"))
            self.c["pause"] = gr.Button("Pause", elem_id=self.eid("pause"))
            self.c["resume"] = gr.Button("Resume", elem_id=self.eid("resume"))
            self.c["interrupt"] = gr.Button("Interrupt", elem_id=self.eid("interrupt"))
        host = self.ctx.host  # the line is redrawn at every page load, Train and status poll
        self.c["checkpoint"] = gr.HTML(lambda: checkpoint_line(host), elem_id=self.eid("checkpoint"))
        with gr.Row():
            self.c["estimate"] = gr.Button("Estimate memory", elem_id=self.eid("estimate"), size="sm")
            self.c["fit_size"] = gr.Textbox("", label="Card memory", placeholder="8GB (empty: this GPU's free memory)",
                                            elem_id=self.eid("fit_size"))
            self.c["apply_plan"] = gr.Button("Apply plan", elem_id=self.eid("apply_plan"), size="sm")
        self.c["plan"] = gr.State({})
        self.c["memory"] = gr.HTML("", elem_id=self.eid("memory"))
        self.c["status"] = gr.HTML("", elem_id=self.eid("status"))
        view = self.actions.status()
        self.c["progress"] = gr.HTML(view.progress, elem_id=self.eid("progress"))
        self.c["plot"] = gr.HTML(view.plot, elem_id=self.eid("loss_plot"))
        self.c["gallery"] = gr.Gallery(value=gallery_value(view.gallery), label="Previews (one per preview step)",
                                       columns=4, height=320, elem_id=self.eid("gallery"))
        self.c["result"] = gr.HTML(view.result, elem_id=self.eid("result"))
        pick_step.build(gr, self.ctx.runner, self.spec.key, self.eid)
        self.c["refresh"] = gr.Button("refresh", elem_id=self.eid("refresh"), elem_classes=["finetune-hidden"])
        self.c["task"] = gr.Textbox(value=self.slug, visible=False, elem_id=self.eid("task_id"))
        self.c["poll"] = gr.State(None)

    # --- wiring -------------------------------------------------------------------------------------------
    def _wire(self) -> None:
        wire(self)

    def collect(self, values: list[Any]) -> Values:
        """Form values (in `self.fields` order) -> section -> field -> value."""
        out: Values = {s: {} for s in SECTIONS}
        for (section, name, _), value in zip(self.fields, values):
            out[section][name] = value
        return out
