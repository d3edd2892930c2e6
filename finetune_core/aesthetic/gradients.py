"""Aesthetic Gradients (methods.md §5): create an aesthetic embedding from a folder of images (the mean of the CLIP
image features), and the settings and the library of embeddings that apply one at generation time (the chunk hook
itself is `personalized_text.PersonalizedText`).

Setting names, defaults and infotext keys are the original extension's, so pasting an old image's parameters
restores them.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune_core.aesthetic.clip_vision import load_clip, load_text_projection
from finetune_core.aesthetic.personalized_text import (
    AestheticTarget,
    ConditioningCache,
    Personalization,
    PersonalizedText,
)
from finetune_core.aesthetic.tiny_clip import BUILT_IN
from finetune_core.errors import ArtifactError, ConfigError, DatasetError, ModelMismatchError
from finetune_core.formats.aesthetic import (
    AestheticFiles,
    find_aesthetic_embeddings,
    read_aesthetic_embedding,
    read_aesthetic_sidecar,
    write_aesthetic_files,
)
from finetune_core.formats.clip_weights import TRY_TINY
from finetune_core.model.interface import DiffusionModel
from finetune_core.settings import type_problems

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".tiff", ".webp")  # the original extension's list
NONE = "None"  # the dropdown entry that switches the section off, as in the original
MAX_STEPS, MAX_LR = 50, 0.1
# Setting -> infotext key (the original's keys; ours are written only when not at their default).
INFOTEXT = {"aesthetic_lr": "Aesthetic LR", "aesthetic_weight": "Aesthetic weight",
            "aesthetic_steps": "Aesthetic steps", "aesthetic_embedding": "Aesthetic embedding",
            "aesthetic_slerp": "Aesthetic slerp", "aesthetic_text": "Aesthetic text",
            "aesthetic_text_negative": "Aesthetic text negative", "aesthetic_slerp_angle": "Aesthetic slerp angle",
            "aesthetic_empty_prompts": "Aesthetic empty prompts"}
ORIGINAL_KEYS = tuple(INFOTEXT)[:8]
Progress = Callable[[int, int], None]  # (images done, images in all); may raise to stop


@dataclass(frozen=True)
class AestheticCreateConfig:
    """The original's "Create aesthetic embedding" form, plus the CLIP model it used to download."""

    data_dir: str = field(default="", metadata={
        "label": "Source directory", "help": "A folder of images (png, jpg, jpeg, gif, tiff, webp) in the style "
        "you want; the embedding is the mean of their CLIP image features."})
    clip_model: str = field(default="", metadata={
        "label": "CLIP model", "help": "A local CLIP with its image tower: a transformers CLIP folder "
        "(openai/clip-vit-large-patch14 for SD1, laion/CLIP-ViT-H-14-laion2B-s32B-b79K for SD2, "
        "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k for SDXL) or an open_clip model file. Nothing is downloaded. "
        "To try things out on a tiny model: tiny-clip (tiny-sd1, tiny-sdxl) or tiny-clip-h (tiny-sd2), built-in "
        "CLIPs with random weights (their embeddings mean nothing about style)."})
    batch_size: int = field(default=256, metadata={
        "label": "Batch size", "help": "Images per CLIP forward pass (1-1024).", "minimum": 1, "maximum": 1024})

    def validate(self) -> None:
        """Raise ConfigError listing every problem (paths are checked when the embedding is made)."""
        problems = type_problems(self)
        if not problems and not 1 <= self.batch_size <= 1024:
            problems.append(f"batch size must be between 1 and 1024, not {self.batch_size}")
        if not problems and not self.data_dir.strip():
            problems.append("the source directory is empty: name a folder of images")
        if not problems and not self.clip_model.strip():
            problems.append(f"no CLIP model is set: name a local CLIP folder or open_clip file (see its help)"
                            f"{TRY_TINY}")
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class AestheticApplyConfig:
    """The original's section in txt2img/img2img (same defaults), plus two settings of ours (advanced)."""

    aesthetic_embedding: str = field(default=NONE, metadata={
        "label": "Aesthetic imgs embedding", "help": "The embedding to steer toward; None switches the section off."})
    aesthetic_weight: float = field(default=0.9, metadata={
        "label": "Aesthetic weight", "help": "How much of the personalised conditioning to blend in (0-1).",
        "minimum": 0.0, "maximum": 1.0})
    aesthetic_steps: int = field(default=5, metadata={
        "label": "Aesthetic steps", "help": "Optimisation steps per prompt chunk (0-50); 0 switches it off.",
        "minimum": 0, "maximum": MAX_STEPS})
    aesthetic_lr: float = field(default=0.0001, metadata={
        "label": "Aesthetic learning rate", "help": "Adam's learning rate for those steps (0-0.1).",
        "minimum": 0.0, "maximum": MAX_LR})
    aesthetic_slerp: bool = field(default=False, metadata={
        "label": "Slerp interpolation", "help": "Blend by spherical instead of linear interpolation."})
    aesthetic_text: str = field(default="", metadata={
        "label": "Aesthetic text for imgs", "help": "A text that rotates the embedding's direction (optional)."})
    aesthetic_slerp_angle: float = field(default=0.1, metadata={
        "label": "Slerp angle", "help": "How far toward the text to turn (0-1).", "minimum": 0.0, "maximum": 1.0})
    aesthetic_text_negative: bool = field(default=False, metadata={
        "label": "Is negative text", "help": "Turn away from the text instead of toward it."})
    aesthetic_empty_prompts: bool = field(default=False, metadata={
        "label": "Also on empty prompts", "advanced": True,
        "help": "Personalise empty prompt chunks too (an empty negative prompt), as the original did."})
    clip_model: str = field(default="", metadata={
        "label": "CLIP model", "advanced": True,
        "help": "For embeddings without our .safetensors copy (e.g. downloaded .pt files): the CLIP folder or file "
                "they were made with, whose text projection is read (tiny-clip, tiny-clip-h: the built-in ones)."})

    @property
    def active(self) -> bool:
        return self.aesthetic_embedding not in ("", NONE) and self.personalization().active

    def validate(self) -> None:
        """Raise ConfigError listing every problem."""
        problems = type_problems(self)
        if not problems:
            problems = _range_problems(self)
        if problems:
            raise ConfigError(problems)

    def personalization(self) -> Personalization:
        return Personalization(self.aesthetic_weight, self.aesthetic_steps, self.aesthetic_lr, self.aesthetic_slerp,
                               self.aesthetic_text, self.aesthetic_text_negative, self.aesthetic_slerp_angle,
                               self.aesthetic_empty_prompts)

    def infotext(self) -> dict[str, Any]:
        """Infotext entries as the original writes them (plus ours when they are not at their default)."""
        out = {INFOTEXT[name]: getattr(self, name) for name in ORIGINAL_KEYS}
        if self.aesthetic_empty_prompts:
            out[INFOTEXT["aesthetic_empty_prompts"]] = True
        return out


def _range_problems(config: AestheticApplyConfig) -> list[str]:
    problems = []
    if not 0.0 <= config.aesthetic_weight <= 1.0:
        problems.append(f"aesthetic weight must be between 0 and 1, not {config.aesthetic_weight}")
    if not 0 <= config.aesthetic_steps <= MAX_STEPS:
        problems.append(f"aesthetic steps must be between 0 and {MAX_STEPS}, not {config.aesthetic_steps}")
    if not 0.0 <= config.aesthetic_lr <= MAX_LR:
        problems.append(f"aesthetic learning rate must be between 0 and {MAX_LR}, not {config.aesthetic_lr}")
    if not 0.0 <= config.aesthetic_slerp_angle <= 1.0:
        problems.append(f"slerp angle must be between 0 and 1, not {config.aesthetic_slerp_angle}")
    return problems


# --- create ----------------------------------------------------------------------------------------------------
def image_files(folder: str | Path) -> list[Path]:
    """The images in `folder` (top level, the original's suffixes), or a sentence naming the folder."""
    source = Path(folder).expanduser()
    if not source.is_dir():
        raise DatasetError(f"the source directory {source} does not exist or is not a folder; name a folder of "
                           f"images")
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"the source directory {source} has no images ({', '.join(IMAGE_SUFFIXES)}); put the "
                           f"images whose style you want in it")
    return files


def mean_image_features(clip: Any, files: Sequence[Path], batch_size: int,
                        progress: Progress | None = None) -> torch.Tensor:
    """(1, D) float32: the mean over all readable images of the projected, unnormalised CLIP image features; an
    image that cannot be read (damaged, or a header claiming billions of pixels) is skipped with a warning naming it,
    as training skips it."""
    total = torch.zeros(1, clip.dim, dtype=torch.float64)
    used = 0
    for start in range(0, len(files), batch_size):
        images = [image for image in map(_read_image, files[start:start + batch_size]) if image is not None]
        if images:
            total += clip.features(images).double().sum(dim=0, keepdim=True)
            used += len(images)
        if progress is not None:
            progress(min(start + batch_size, len(files)), len(files))
    if not used:
        raise DatasetError(f"none of the {len(files)} images in {Path(files[0]).parent} can be read (the log names "
                           f"each); replace them with valid image files")
    return (total / used).float()


def _read_image(path: Path) -> Any:
    """The decoded image, or None (with a warning naming the file) when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        logger.warning("skipping %s: it cannot be read as an image (%s)", path, str(exc).splitlines()[0][:200])
        return None


def create_embedding(name: str, config: AestheticCreateConfig, folder: Path, overwrite: bool = False,
                     device: str | torch.device = "cpu", progress: Progress | None = None) -> list[Path]:
    """Make `<name>.pt` and its safetensors copy in `folder` from the images in `config.data_dir`."""
    files = image_files(config.data_dir)
    clip = load_clip(config.clip_model, device)
    vector = mean_image_features(clip, files, config.batch_size, progress)
    if not bool(torch.isfinite(vector).all()) or float(vector.norm()) == 0.0:
        raise ArtifactError(f"the CLIP model {clip.files.source} gave features that are zero or not numbers for "
                            f"these images; check that it is a working CLIP model")
    metadata = {"name": name, "clip_model": clip.name, "clip_source": str(clip.files.source),
                "image_count": str(len(files)), "images_folder": str(Path(config.data_dir).expanduser()),
                "created": datetime.datetime.now().isoformat(timespec="seconds")}
    return write_aesthetic_files(vector, clip.text_projection, metadata, folder, name, overwrite)


# --- apply -----------------------------------------------------------------------------------------------------
class AestheticLibrary:
    """The embeddings a host offers (listed afresh every time, so new files show without a restart), the targets
    read from them (kept while their files are unchanged) and the personalised-conditioning cache."""

    def __init__(self, folders: Callable[[], Sequence[Path]], cache: ConditioningCache | None = None) -> None:
        self._folders = folders
        self.cache = cache or ConditioningCache()
        self._targets: dict[tuple[Any, ...], AestheticTarget] = {}

    def files(self) -> dict[str, AestheticFiles]:
        return find_aesthetic_embeddings(self._folders())

    def names(self) -> list[str]:
        """The dropdown's choices: None, then every embedding by name."""
        return [NONE, *sorted(self.files(), key=str.lower)]

    def target(self, name: str, clip_model: str = "") -> AestheticTarget:
        """The embedding `name` with the text projection that goes with it."""
        files = self.files().get(name)
        if files is None:
            where = ", ".join(str(f) for f in self._folders()) or "no folder"
            raise ArtifactError(f"there is no aesthetic embedding {name!r} in {where}; put <name>.pt there or "
                                f"choose one of the list")
        stamp = tuple((p, p.stat().st_mtime_ns, p.stat().st_size) for p in (files.pt, files.sidecar) if p)
        key = (stamp, "" if files.sidecar else clip_model.strip())
        if key not in self._targets:
            self._targets = {key: _read_target(files, clip_model)}  # one kept: they are cheap to read again
        return self._targets[key]

    def hook(self, model: DiffusionModel, config: AestheticApplyConfig, context: str = "") -> PersonalizedText | None:
        """The chunk hook applying `config` on `model`, or None when the settings leave conditioning unchanged."""
        config.validate()
        if not config.active:
            return None
        target = self.target(config.aesthetic_embedding, config.clip_model)
        widths = {spec.width for spec in model.text_encoders}
        if target.text_width not in widths:
            raise ModelMismatchError(
                f"the aesthetic embedding {target.name!r} was made with a CLIP whose text width is "
                f"{target.text_width}, but this {model.family.upper()} model's text encoders are "
                f"{' and '.join(map(str, sorted(widths)))} wide: make it with the CLIP of this model family "
                f"(ViT-L/14 for SD1 and SDXL, ViT-H/14 for SD2, ViT-bigG/14 for SDXL; on the tiny models the "
                f"built-in {BUILT_IN})")
        return PersonalizedText(target, config.personalization(), self.cache, context)


def _read_target(files: AestheticFiles, clip_model: str) -> AestheticTarget:
    if files.sidecar is not None:
        vector, projection, _ = read_aesthetic_sidecar(files.sidecar)
        if files.pt is not None:
            vector = read_aesthetic_embedding(files.pt)  # the .pt is what the user may have replaced
    else:
        vector = read_aesthetic_embedding(files.pt)  # type: ignore[arg-type]
        if not clip_model.strip():
            raise ArtifactError(f"the aesthetic embedding {files.name!r} ({files.pt}) has no .safetensors copy "
                                f"with its CLIP's text projection: set the CLIP model it was made with (a local "
                                f"transformers folder such as openai/clip-vit-large-patch14, or an open_clip file)")

        projection = load_text_projection(clip_model)
    if projection.shape[1] != vector.shape[1]:
        raise ModelMismatchError(f"the aesthetic embedding {files.name!r} is {vector.shape[1]} wide but the CLIP "
                                 f"text projection is {projection.shape[1]} wide: use the CLIP it was made with")
    if not bool(torch.isfinite(vector).all()) or math.isclose(float(vector.norm()), 0.0):
        raise ArtifactError(f"the aesthetic embedding {files.path} is zero or holds values that are not numbers; "
                            f"create it again")
    return AestheticTarget.of(files.name, vector, projection)
