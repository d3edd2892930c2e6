"""The network types of the WebUI's built-in Lora extension, one file each; `NETWORK_TYPES` is the registry."""

from finetune_core.formats.networks.module_type import (
    CONV,
    DORA,
    LINEAR,
    NORM,
    Dropouts,
    Layer,
    NetworkType,
    Shape,
    Tensors,
    column_norm,
    finalize,
    weight_decompose,
)
from finetune_core.formats.networks.registry import NETWORK_TYPES, type_of

__all__ = ["CONV", "DORA", "LINEAR", "NETWORK_TYPES", "NORM", "Dropouts", "Layer", "NetworkType", "Shape", "Tensors",
           "column_norm", "finalize", "type_of", "weight_decompose"]
