"""The methods, registered explicitly (one line each, like the WebUI Lora extension's `module_types`): each module
declares its one `MethodSpec` object (`METHOD`)."""

from __future__ import annotations

from finetune_core.methods import dreamartist, dreambooth, hypernetwork, lora, textual_inversion
from finetune_core.methods.base import MethodConfig, MethodSpec

__all__ = ["METHODS", "MethodConfig", "MethodSpec"]

METHODS: dict[str, MethodSpec] = {spec.key: spec for spec in (
    textual_inversion.METHOD,
    hypernetwork.METHOD,
    dreambooth.METHOD,
    dreamartist.METHOD,
    lora.METHOD,
)}
