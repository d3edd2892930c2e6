"""LoRA layer names as kohya's sd-scripts writes them (lora.md §3), derived from the checkpoint key mapping.

A name is a prefix (`lora_unet_`, `lora_te_`; SDXL: `lora_te1_` / `lora_te2_`) and the layer's module path with
`.` replaced by `_`. The UNet path is the diffusers one for SD1/SD2 and the LDM (SAI) one for SDXL: the only forms
that the WebUI, kohya's tools and diffusers all load (lora.md §3.3, §6). Both paths come from one table,
`checkpoint_keys.unet_rules`, so a layer of either backend gets the same name.
"""

from __future__ import annotations

import re

from finetune_core.formats.checkpoint_keys import map_key, unet_rules

UNET_PREFIX = "lora_unet_"
# Which blocks a UNet layer belongs to, by its diffusers path (kohya's target classes, lora.md §3.1):
# Transformer2DModel (the default targets), ResnetBlock2D and Down/Upsample2D (added for LoCon).
TRANSFORMER, RESNET, SAMPLER, TEXT = "transformer", "resnet", "sampler", "text"
_BLOCKS = (
    (re.compile(r"(^|\.)attentions\.\d+\."), TRANSFORMER),
    (re.compile(r"(^|\.)resnets\.\d+\."), RESNET),
    (re.compile(r"(^|\.)(down|up)samplers\.0\.conv$"), SAMPLER),
)
# The layers of CLIPAttention and CLIPMLP in a transformers CLIP text model (kohya's text-encoder targets).
_TEXT_LAYER = re.compile(r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def text_prefixes(family: str) -> dict[str, str]:
    """Name prefix per text encoder: one encoder is `lora_te_`; SDXL's two are `lora_te1_` and `lora_te2_`."""
    if family == "sdxl":
        return {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    return {"text_encoder": "lora_te_"}


def unet_layer(path: str, family: str, layout: str) -> tuple[str, str] | None:
    """(kohya name, block) of a UNet layer given its module path in `layout` ("diffusers" or "ldm"); None for a
    layer kohya never targets (conv_in, conv_out, time embeddings, norms) or one outside the SD layout."""
    rules = unet_rules(family)
    diffusers: str | None = path + "."
    ldm: str | None = path + "."
    if layout == "diffusers":
        ldm = map_key(path + ".", rules)
    else:
        diffusers = map_key(path + ".", rules, reverse=True)
    if diffusers is None or ldm is None:
        return None
    block = next((name for pattern, name in _BLOCKS if pattern.search(diffusers[:-1])), None)
    if block is None:
        return None
    chosen = ldm if family == "sdxl" else diffusers
    return UNET_PREFIX + chosen[:-1].replace(".", "_"), block


def text_layer(path: str, prefix: str) -> str | None:
    """The kohya name of a transformers CLIP text-model layer (`text_model.encoder.layers.N.self_attn.q_proj`),
    or None when kohya does not target it."""
    if not _TEXT_LAYER.match(path):
        return None
    return prefix + path.replace(".", "_")
