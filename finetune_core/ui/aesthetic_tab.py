"""The Fine-tune tab's Aesthetic Gradients section (both hosts) and its REST routes: create an embedding from a
folder of images, preview one on the loaded model (the same seed without and with it). In the WebUI the embedding
is then used from the txt2img/img2img section; elsewhere from `aesthetic apply` or these routes."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_core.aesthetic import aesthetic_service
from finetune_core.aesthetic.gradients import (
    AestheticApplyConfig,
    AestheticCreateConfig,
    AestheticLibrary,
)
from finetune_core.errors import ConfigError
from finetune_core.hosts.host import Host
from finetune_core.hosts.job_runner import JobRunner
from finetune_core.ui.actions import guarded, message_html
from finetune_core.ui.compat import NO_API
from finetune_core.ui.forms import build_section
from finetune_core.ui.rest_body import object_field, refuse_unknown_fields, required_text
from finetune_core.ui.schema import coerce_all, field_specs

INTRO = ("Create an aesthetic embedding: the mean CLIP image feature of a folder of images in the style you want. "
         "Generation then steers each prompt toward it (Aesthetic Gradients). Inside the WebUI use it from the "
         "**Aesthetic Gradients** section of txt2img and img2img; here you can preview it on the loaded model.")


class AestheticJobs:
    """What the tab and the REST routes do, on one library (and conditioning cache) per host."""

    def __init__(self, host: Host, runner: JobRunner) -> None:
        self.host, self.runner = host, runner
        self.library: AestheticLibrary = aesthetic_service.library(host.aesthetic_folders)

    def create(self, name: str, settings: dict[str, Any], overwrite: Any = False) -> list[Path]:
        folders = self.host.folders()
        clip = self.host.default_aesthetic_clip()
        aesthetic_service.validate_create(name, settings, folders, overwrite, clip)  # before waiting for the lock
        paths = self.runner.run_with_model(
            lambda: aesthetic_service.create(name, settings, folders, overwrite, None, None, clip))
        self.host.artifacts_written("aesthetic_embeddings", list(paths))
        return paths

    def preview(self, settings: dict[str, Any], preview: dict[str, Any], from_text: bool = False) -> list[Any]:
        """[image without the embedding, image with it], the same seed."""
        config = aesthetic_service.apply_config(settings, from_text)
        sample = aesthetic_service.preview_config(preview, from_text)

        def work() -> list[Any]:
            model = self.host.get_model()
            plain = aesthetic_service.generate(model, self.library, AestheticApplyConfig(), sample)
            return [plain[0], aesthetic_service.generate(model, self.library, config, sample)[0]]

        return self.runner.run_with_model(work)


class AestheticTab:
    """Builds the section inside the current Gradio Blocks context."""

    def __init__(self, gr: Any, jobs: AestheticJobs) -> None:
        self.gr, self.jobs = gr, jobs
        self.specs = {"create": field_specs(AestheticCreateConfig), "apply": field_specs(AestheticApplyConfig),
                      "preview": field_specs(aesthetic_service.AestheticPreviewConfig)}

    def build(self) -> None:
        gr = self.gr
        gr.Markdown(INTRO)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                name = gr.Textbox(label="Name", elem_id="finetune_aesthetic_name")
                create = build_section(gr, self.specs["create"], "finetune_aesthetic_create")
                overwrite = gr.Checkbox(label="Overwrite an embedding of the same name", value=False,
                                        elem_id="finetune_aesthetic_overwrite")
                create_button = gr.Button("Create aesthetic embedding", variant="primary",
                                          elem_id="finetune_aesthetic_create_button")
                created = gr.HTML("", elem_id="finetune_aesthetic_created")
            with gr.Column(scale=1):
                apply = build_section(gr, self.specs["apply"], "finetune_aesthetic_apply",
                                      dynamic={"aesthetic_embedding": self.jobs.library.names})
                preview = build_section(gr, self.specs["preview"], "finetune_aesthetic_preview")
                preview_button = gr.Button("Preview: without and with", elem_id="finetune_aesthetic_preview_button")
                images = gr.Gallery(label="Preview", columns=2, elem_id="finetune_aesthetic_gallery")
                previewed = gr.HTML("", elem_id="finetune_aesthetic_previewed")
        self._wire_create(name, create, overwrite, create_button, created, apply["aesthetic_embedding"])
        self._wire_preview(apply, preview, preview_button, images, previewed)

    def _wire_create(self, name: Any, fields: dict[str, Any], overwrite: Any, button: Any, out: Any,
                     dropdown: Any) -> None:
        gr, keys = self.gr, list(fields)

        def on_create(name_value: str, overwrite_value: bool, *values: Any) -> tuple:
            settings = coerce_all(self.specs["create"], dict(zip(keys, values)))
            paths = self.jobs.create(name_value, settings, overwrite_value)
            text = message_html(f"Wrote {' and '.join(str(p) for p in paths)}.")
            return text, gr.update(choices=self.jobs.library.names())

        button.click(fn=guarded(gr, on_create, 2, 0), inputs=[name, overwrite, *fields.values()],
                     outputs=[out, dropdown], **NO_API)

    def _wire_preview(self, apply: dict[str, Any], preview: dict[str, Any], button: Any, gallery: Any,
                      out: Any) -> None:
        gr, apply_keys, preview_keys = self.gr, list(apply), list(preview)

        def on_preview(*values: Any) -> tuple:
            settings = coerce_all(self.specs["apply"], dict(zip(apply_keys, values[:len(apply_keys)])))
            sample = coerce_all(self.specs["preview"], dict(zip(preview_keys, values[len(apply_keys):])))
            if str(settings.get("aesthetic_embedding") or "None") == "None":
                raise ConfigError("choose an aesthetic embedding to preview")
            plain, styled = self.jobs.preview(settings, sample)
            name = settings["aesthetic_embedding"]
            return [(plain, "without"), (styled, f"with {name}")], message_html(f"Seed {sample.get('seed', 0)}.")

        button.click(fn=guarded(gr, on_preview, 2, 1), inputs=[*apply.values(), *preview.values()],
                     outputs=[gallery, out], **NO_API)


# --- REST --------------------------------------------------------------------------------------------------------
def routes(jobs: AestheticJobs) -> dict[str, Callable[[dict], Any]]:
    """POST bodies -> answers, under /finetune/v1/aesthetic/ (the error contract of `ui.api`); `apply` answers
    two base64 PNGs, the same seed without and with the embedding, and their infotexts."""
    def create(body: dict) -> dict[str, Any]:
        refuse_unknown_fields(body, {"name", "settings", "overwrite"}, "aesthetic create")
        paths = jobs.create(required_text(body, "name"), object_field(body, "settings"), body.get("overwrite", False))
        return {"paths": [str(p) for p in paths]}

    def apply(body: dict) -> dict[str, Any]:
        refuse_unknown_fields(body, {"settings", "preview"}, "aesthetic apply")
        settings, preview = object_field(body, "settings"), object_field(body, "preview")
        config = aesthetic_service.apply_config(settings)
        sample = aesthetic_service.preview_config(preview)
        images = jobs.preview(settings, preview)
        model = jobs.host.get_model()
        texts = [aesthetic_service.infotext(AestheticApplyConfig(), sample, model),
                 aesthetic_service.infotext(config, sample, model)]
        return {"images": [_png_base64(image) for image in images], "infotexts": texts}

    return {"/aesthetic/create": create, "/aesthetic/apply": apply}


def _png_base64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
