"""WebUI entry of Aesthetic Gradients: the section in txt2img and img2img. No logic here (see
finetune_core/aesthetic/webui_script.py). The Fine-tune tab's own section creates the embeddings."""

from __future__ import annotations

import os
import sys

from modules import script_callbacks, scripts

EXT_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if EXT_DIR not in sys.path:  # imported some other way than by the WebUI's loader (tests, tools)
    sys.path.insert(0, EXT_DIR)

from finetune_core.aesthetic.webui_script import AestheticSection

SECTION = AestheticSection()


class AestheticGradientsScript(scripts.Script):
    """Always visible in txt2img and img2img, folded."""

    def title(self):
        return "Aesthetic Gradients"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return SECTION.ui(self)

    def process(self, p, *args):
        SECTION.process(p, args)


script_callbacks.on_script_unloaded(SECTION.unload, name="finetune-aesthetic")
