"""The registry of network types, in the order the WebUI's `module_types` tries them (networks.py): the first type
whose key parts a module has is its type. Adding a type is its file and one line here."""

from __future__ import annotations

from collections.abc import Collection

from finetune_core.formats.networks.module_type import NetworkType
from finetune_core.formats.networks.network_full import Full
from finetune_core.formats.networks.network_glora import Glora
from finetune_core.formats.networks.network_ia3 import Ia3
from finetune_core.formats.networks.network_loha import Loha
from finetune_core.formats.networks.network_lokr import Lokr
from finetune_core.formats.networks.network_lora import Lora
from finetune_core.formats.networks.network_norm import Norm
from finetune_core.formats.networks.network_oft import Oft

NETWORK_TYPES: dict[str, NetworkType] = {
    "lora": Lora(),
    "loha": Loha(),
    "ia3": Ia3(),
    "lokr": Lokr(),
    "full": Full(),
    "norm": Norm(),
    "glora": Glora(),
    "oft": Oft(),
}


def type_of(parts: Collection[str]) -> NetworkType | None:
    """The first registered type that accepts a module's key parts (None: no type does, the WebUI's load fails)."""
    return next((kind for kind in NETWORK_TYPES.values() if kind.accepts(parts)), None)
