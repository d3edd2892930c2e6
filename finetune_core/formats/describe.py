"""What a loaded object is, before any reader commits to it: the embedding and hypernetwork layouts the WebUI loads,
and a short sentence for error messages when an object is neither (used by the readers and the inspector)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def is_embedding(obj: Any) -> bool:
    """Whether a loaded object has one of the embedding layouts the WebUI loads."""
    if not isinstance(obj, Mapping):
        return False
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        return hasattr(params, "values") and len(params) == 1
    values = list(obj.values())
    if values and all(isinstance(v, torch.Tensor) for v in values):
        return set(obj) == {"clip_l", "clip_g"} or (len(values) == 1 and values[0].ndim in (1, 2))
    return False


def is_hypernetwork(obj: Any) -> bool:
    """Whether a loaded object is a hypernetwork dict: int size keys mapping to (k, v) pairs of state dicts."""
    if not isinstance(obj, Mapping):
        return False
    sizes = [k for k in obj if isinstance(k, int) and not isinstance(k, bool)]
    return bool(sizes) and all(isinstance(obj[k], (tuple, list)) and len(obj[k]) == 2
                               and all(isinstance(sd, Mapping) for sd in obj[k]) for k in sizes)


def describe_object(obj: Any) -> str:
    """A short sentence saying what a loaded object looks like, for error messages."""
    if isinstance(obj, torch.Tensor):
        return (f"it holds one bare tensor of shape {tuple(obj.shape)} "
                f"(an aesthetic embedding looks like this)")
    if not isinstance(obj, Mapping):
        return f"it holds a {type(obj).__name__}, not a dict"
    if is_hypernetwork(obj):
        sizes = ", ".join(str(k) for k in obj if isinstance(k, int))
        return f"this file is a hypernetwork (sizes {sizes}), not an embedding"
    keys = [str(k) for k in obj][:6]
    tensor_count = sum(isinstance(v, torch.Tensor) for v in obj.values())
    more = ", ..." if len(obj) > 6 else ""
    return (f"it is a dict with {len(obj)} keys ({', '.join(keys)}{more}) and {tensor_count} tensors; an embedding "
            f"has 'string_to_param', only 'clip_l'/'clip_g', or exactly one tensor")
