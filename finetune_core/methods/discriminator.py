"""DreamArtist's optional discriminator: a ConvNeXt-Tiny image classifier with 3 classes, class 1 meaning "good".

As in the original extension (methods.md §4.1): decoded pixels in [-1, 1] -> [0, 1] -> ImageNet mean/std -> bicubic
resize to 384x384 -> ConvNeXt-Tiny -> softmax; the loss term is mean(1 - p(class 1)). The network is timm's
`convnext_tiny` (timm comes with the WebUI through open-clip-torch); its weights come from a file the user names,
in timm's key layout or in the original ConvNeXt release's (which timm's own converter maps). No weights ship.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from finetune_core.errors import ArtifactError, ConfigError
from finetune_core.formats.atomic import load_pt

INPUT_SIZE = 384
NUM_CLASSES = 3
GOOD_CLASS = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _timm() -> Any:
    try:
        import timm
        import timm.models.convnext
    except ImportError as exc:
        raise ConfigError(f"the discriminator needs the Python package timm, which does not import here ({exc}); "
                          f"install timm with the torchvision that matches your torch, or leave the discriminator "
                          f"file empty") from None
    return timm


def build_network(timm: Any) -> torch.nn.Module:
    """An untrained ConvNeXt-Tiny with 3 classes, as the original creates it (no stochastic depth)."""
    return timm.create_model("convnext_tiny", pretrained=False, num_classes=NUM_CLASSES, drop_path_rate=0.0)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file (.safetensors, or a torch file read with weights_only=True); a training
    checkpoint's `model` / `state_dict` entry is taken when the file holds one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"the discriminator file {path} does not exist; give the path of a ConvNeXt-Tiny state "
                          f"dict, or leave it empty")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file
            data: Any = load_file(str(path))
        else:
            data = load_pt(path)  # its refusal of an unsafe pickle never suggests loading it unsafely
    except Exception as exc:  # any unreadable or unsafe file: one sentence, whatever the reader raised
        raise ArtifactError(f"the discriminator file {path} could not be read as a state dict ({exc}); give a "
                            f"ConvNeXt-Tiny state dict (.pth, .pt or .safetensors)") from None
    for key in ("model", "state_dict"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
    if not isinstance(data, Mapping):
        raise ArtifactError(f"the discriminator file {path} holds a {type(data).__name__}, not a state dict")
    return {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _fitted(state: dict[str, torch.Tensor], network: torch.nn.Module, timm: Any, path: Path) -> dict[str, Any]:
    """The state dict in timm's layout; ArtifactError naming what does not fit a 3-class ConvNeXt-Tiny."""
    try:
        converted = timm.models.convnext.checkpoint_filter_fn(dict(state), network)
    except Exception:  # timm's converter indexes the model by the file's keys: a foreign file raises anything
        converted = dict(state)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = sorted(k for k in set(expected) & set(converted) if tuple(expected[k].shape) != tuple(converted[k].shape))
    if missing or unexpected or wrong:
        example = (missing or unexpected or wrong)[0]
        raise ArtifactError(
            f"the discriminator file {path} is not a ConvNeXt-Tiny state dict with {NUM_CLASSES} classes "
            f"({len(missing)} weights missing, {len(unexpected)} unexpected, {len(wrong)} of another shape, e.g. "
            f"{example!r}); give the classifier's own state dict")
    return converted


def check_discriminator_file(path: str | Path) -> None:
    """Refuse, before a job starts, a file that is missing or not a 3-class ConvNeXt-Tiny, or a missing timm."""
    timm = _timm()
    state = read_state_dict(Path(path))
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        network = build_network(timm)
    _fitted(state, network, timm, Path(path))


class Discriminator:
    """The frozen classifier on a device; `score(pixels)` is p(good) per image, differentiable in the pixels."""

    def __init__(self, network: torch.nn.Module, device: torch.device) -> None:
        self.network = network.to(device, torch.float32).eval().requires_grad_(False)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).reshape(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).reshape(1, 3, 1, 1)

    def score(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B,) probability of the "good" class for pixels (B, 3, H, W) in [-1, 1]."""
        x = ((pixels.float() + 1.0) / 2.0 - self.mean) / self.std
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", align_corners=True)
        return torch.softmax(self.network(x).float(), dim=-1)[:, GOOD_CLASS]

    def loss(self, pixels: torch.Tensor) -> torch.Tensor:
        """mean(1 - p(good)) over the batch."""
        return (1.0 - self.score(pixels)).mean()


def load_discriminator(path: str | Path, device: torch.device) -> Discriminator:
    """Build timm's ConvNeXt-Tiny and load the file's weights into it (strictly, after timm's key conversion)."""
    timm = _timm()
    state = read_state_dict(Path(path))
    network = build_network(timm)
    network.load_state_dict(_fitted(state, network, timm, Path(path)))
    return Discriminator(network, device)
