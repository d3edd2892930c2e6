"""The Aesthetic Gradients section of txt2img and img2img inside the WebUI (what `scripts/aesthetic_gradients.py`
registers): the original extension's controls, defaults and infotext keys, applied through the WebUI's own
conditioning path. Imports the WebUI's `modules` lazily.

How it attaches: `process()` (called inside the generation, where the queue lock is already held) wraps this
generation's `p.get_conds_with_caching` and `p.cached_params` on the instance. Every conditioning the generation
computes (first pass, hires fix, refiner) then runs with the chunk hook on the loaded model's text encoders, and
only for that call: the hook is off again when the call returns or raises, and nothing outside `p` is changed. The
WebUI's own conditioning cache gets the section's settings in its key, so switching the section on or off never
reuses the other's conditioning. A bad setting or file fails the generation with one sentence rather than producing
unchanged images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from finetune_core.aesthetic.gradients import INFOTEXT, NONE, AestheticApplyConfig, AestheticLibrary
from finetune_core.errors import FinetuneError
from finetune_core.model.webui_backend import WebUIModel
from finetune_core.settings import coerce_settings

logger = logging.getLogger(__name__)
CLIP_SETTING = "finetune_aesthetic_clip"
# The order of the script's arguments: the original's eight, then ours (API callers may send only the first eight).
ARGUMENTS = ("aesthetic_weight", "aesthetic_steps", "aesthetic_lr", "aesthetic_slerp", "aesthetic_embedding",
             "aesthetic_text", "aesthetic_slerp_angle", "aesthetic_text_negative", "aesthetic_empty_prompts")


def webui_folders() -> list[Path]:
    """models/aesthetic_embeddings, then every extension's aesthetic_embeddings folder (the original's included)."""
    from modules import paths

    own = Path(paths.models_path) / "aesthetic_embeddings"
    others = sorted(Path(paths.extensions_dir).glob("*/aesthetic_embeddings"))
    return [own, *others]


class AestheticSection:
    """The section's state for the WebUI's lifetime: the library of embeddings and the conditioning cache."""

    def __init__(self, folders: Callable[[], Sequence[Path]] = webui_folders) -> None:
        self.library = AestheticLibrary(folders)
        self._model: Any = None

    # --- the controls ------------------------------------------------------------------------------------------
    def ui(self, script: Any) -> list[Any]:
        """The original's controls (labels, ranges, defaults), plus "Also on empty prompts"; sets infotext_fields."""
        import gradio as gr
        from modules import ui_common

        with gr.Group(), gr.Accordion("Aesthetic Gradients", open=False):
            with gr.Row():
                weight = gr.Slider(minimum=0, maximum=1, step=0.01, label="Aesthetic weight", value=0.9,
                                   elem_id=script.elem_id("weight"))
                steps = gr.Slider(minimum=0, maximum=50, step=1, label="Aesthetic steps", value=5,
                                  elem_id=script.elem_id("steps"))
            with gr.Row():
                lr = gr.Textbox(label="Aesthetic learning rate", placeholder="Aesthetic learning rate", value="0.0001",
                                elem_id=script.elem_id("lr"))
                slerp = gr.Checkbox(label="Slerp interpolation", value=False, elem_id=script.elem_id("slerp"))
                embedding = gr.Dropdown(self.library.names(), label="Aesthetic imgs embedding", value=NONE,
                                        elem_id=script.elem_id("embedding"))
                ui_common.create_refresh_button(embedding, lambda: None, lambda: {"choices": self.library.names()},
                                                script.elem_id("refresh"))
            with gr.Row():
                text = gr.Textbox(label="Aesthetic text for imgs", value="", elem_id=script.elem_id("text"),
                                  placeholder="This text is used to rotate the feature space of the imgs embs")
                angle = gr.Slider(label="Slerp angle", minimum=0, maximum=1, step=0.01, value=0.1,
                                  elem_id=script.elem_id("slerp_angle"))
                negative = gr.Checkbox(label="Is negative text", value=False, elem_id=script.elem_id("negative"))
            empty = gr.Checkbox(label="Also on empty prompts (an empty negative prompt)", value=False,
                                elem_id=script.elem_id("empty_prompts"))
        controls = [weight, steps, lr, slerp, embedding, text, angle, negative, empty]
        script.infotext_fields = [(control, INFOTEXT[name]) for control, name in zip(controls, ARGUMENTS)]
        return controls

    # --- a generation ------------------------------------------------------------------------------------------
    def process(self, p: Any, args: Sequence[Any]) -> None:
        """Set up this generation `p` (see the module docstring)."""
        try:
            config = self.config(args)
            if config.aesthetic_embedding in ("", NONE):
                return
            p.extra_generation_params.update(config.infotext())
            if not config.active:
                return
            from modules import shared

            digest = self.library.hook(self.model_for(shared.sd_model), config).target.digest  # type: ignore[union-attr]
        except FinetuneError as exc:
            _refuse(p, FinetuneError(f"Aesthetic Gradients: {exc}"))
            return
        self._attach(p, config, digest)

    def config(self, args: Sequence[Any]) -> AestheticApplyConfig:
        """The section's values as typed settings (the WebUI gives text for the rate, floats for sliders)."""
        from modules import shared

        values = dict(zip(ARGUMENTS, args))
        if "aesthetic_steps" in values and isinstance(values["aesthetic_steps"], float):
            values["aesthetic_steps"] = str(values["aesthetic_steps"])  # a slider's 5.0 (the coercer takes text)
        typed = coerce_settings(AestheticApplyConfig, values, "Aesthetic Gradients", from_text=True)
        config = AestheticApplyConfig(**typed, clip_model=str(getattr(shared.opts, CLIP_SETTING, "") or ""))
        config.validate()
        return config

    def model_for(self, sd_model: Any) -> Any:
        if self._model is None or self._model.sd_model is not sd_model:
            self._model = WebUIModel(sd_model)
        return self._model

    def _attach(self, p: Any, config: AestheticApplyConfig, digest: str) -> None:
        original_conds, original_params = p.get_conds_with_caching, p.cached_params
        section = self

        def cached_params(*args: Any, **kwargs: Any) -> tuple:
            return (*original_params(*args, **kwargs), ("aesthetic", repr(config), digest))

        def get_conds_with_caching(function: Any, required_prompts: Any, steps: Any, caches: Any,
                                   extra_network_data: Any, *rest: Any, **kwargs: Any) -> Any:
            from modules import shared

            model = section.model_for(shared.sd_model)
            hook = section.library.hook(model, config, context=_networks(extra_network_data))
            with model.text_chunk_hook(hook):  # type: ignore[arg-type]
                return original_conds(function, required_prompts, steps, caches, extra_network_data, *rest, **kwargs)

        p.cached_params = cached_params
        p.get_conds_with_caching = get_conds_with_caching

    def unload(self) -> None:
        """Reload UI: nothing is attached outside a generation; let go of the cached rows and the model."""
        self.library.cache.clear()
        self._model = None


def _refuse(p: Any, error: FinetuneError) -> None:
    """Fail this generation with `error` when it computes its conditioning (the WebUI shows the sentence). The
    WebUI's API answers an exception with `vars(e).get('status_code', 500)` and `vars(e).get('detail')`: the
    sentence becomes a 400's detail, not a 500 with it buried in `errors`."""
    error.status_code = 400  # type: ignore[attr-defined]
    error.detail = str(error)  # type: ignore[attr-defined]

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise error

    p.get_conds_with_caching = refuse


def _networks(extra_network_data: Any) -> str:
    """What the generation's extra networks (LoRAs change the text encoder's weights) contribute to cache keys."""
    if not extra_network_data:
        return ""
    return ";".join(f"{name}={[getattr(x, 'items', x) for x in params]}"
                    for name, params in sorted(extra_network_data.items()))
