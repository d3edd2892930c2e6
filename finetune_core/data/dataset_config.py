"""The dataset settings: one frozen dataclass whose field metadata lets a UI build its form."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from finetune_core.data.buckets import RESIZE_MODES
from finetune_core.data.captions import word_regex_problems
from finetune_core.data.templates import DEFAULT_TEMPLATE, resolve_template
from finetune_core.errors import ConfigError
from finetune_core.settings import type_problems

LATENT_SAMPLING = ("once", "deterministic", "random")
CROP_MODES = ("center", "random")


def _setting(default: Any, label: str, help: str, choices: tuple[str, ...] | None = None) -> Any:
    meta: dict[str, Any] = {"label": label, "help": help}
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DatasetConfig:
    """Where the images are and how they become training samples; defaults match the WebUI Train tab."""

    data_dir: str = _setting("", "Dataset directory", "Folder of training images (png, jpg, jpeg, webp, bmp), "
                             "each optionally with a .txt caption of the same name.")
    # Not a form field: hosts set it to the artefact name ("hidden" keeps it out of forms and flags).
    placeholder: str = field(default="", metadata={
        "label": "Name ([name])", "hidden": True,
        "help": "What [name] in the prompt template becomes: the embedding or hypernetwork name."})
    template: str = _setting(DEFAULT_TEMPLATE, "Prompt template", "A shipped template (filewords.txt, "
                             "hypernetwork.txt, none.txt, style.txt, style_filewords.txt, subject.txt, "
                             "subject_filewords.txt) or the path of a .txt file with one prompt per line using [name] "
                             "and [filewords].")
    width: int = _setting(512, "Width", "Training width in pixels (multiple of 8); with buckets, the training area "
                          "is width x height.")
    height: int = _setting(512, "Height", "Training height in pixels (multiple of 8).")
    resize_mode: str = _setting("fixed", "Resize mode", "fixed: resize and crop every image to width x height; "
                                "buckets: aspect-ratio buckets around that area; none: each image keeps its own "
                                "size rounded to 64 (the WebUI's 'Do not resize images').", RESIZE_MODES)
    crop: str = _setting("center", "Crop", "Where the crop is taken when an image's aspect differs from its "
                         "training size; a random crop is chosen once per image.", CROP_MODES)
    batch_size: int = _setting(1, "Batch size", "Images per micro-batch; all images of a batch share a size.")
    repeats: int = _setting(1, "Repeats", "How many times each image appears per epoch.")
    flip_p: float = _setting(0.0, "Horizontal flip probability", "Chance that a sample is mirrored at each step "
                             "(the WebUI never applies its flip).")
    shuffle_tags: bool = _setting(False, "Shuffle tags", "Shuffle the comma-separated tags of [filewords] "
                                  "every step.")
    tag_dropout: float = _setting(0.0, "Tag dropout", "Chance that each tag of [filewords] is left out at a step.")
    keep_tags: int = _setting(0, "Keep first N tags", "The first N tags are never shuffled or dropped.")
    latent_sampling: str = _setting("once", "Latent sampling method", "once: one VAE sample per image; "
                                    "deterministic: the posterior mean; random: a new sample every step.",
                                    LATENT_SAMPLING)
    recursive: bool = _setting(False, "Search subfolders", "Also use the images of subfolders.")
    use_alpha_weight: bool = _setting(False, "Use PNG alpha channel as loss weight", "Transparent areas count "
                                      "less in the loss (weight normalised to min 0, mean 1).")
    attention_masks: bool = _setting(False, "Use attention masks", "A grayscale file <image>_att.<ext> next to an "
                                     "image weighs its loss by area: black 0, mid-grey 1, white 5 (DreamArtist's "
                                     "scale). Such files are never trained on as images.")
    keep_pixels: bool = _setting(False, "Keep pixels", "Keep the cropped images next to their latents (needed by "
                                 "DreamArtist's reconstruction loss).")
    filename_word_regex: str = _setting("", "Filename word regex", "When a caption comes from a file name, keep "
                                        "only the words this regular expression finds.")
    filename_join_string: str = _setting(" ", "Filename join string", "Joins the words the filename regex found.")
    cache_dir: str = _setting("", "Latent cache directory", "Folder to keep encoded latents in between runs; "
                              "empty keeps them in memory only.")
    crop_seed: int = _setting(0, "Crop seed", "Seed of the random crop boxes.")
    validation_dir: str = _setting("", "Validation folder", "Images (with captions) for the validation loss, "
                                   "never trained on; empty: the held-out images, else the training images.")
    validation_split: int = _setting(0, "Hold out N images for validation", "This many images of the dataset "
                                     "(chosen by their content, so the same ones whatever their names) are never "
                                     "trained on and make the validation set; 0 = none.")
    # Not a form field: the service sets it on the validation set's copy of the config (the held-out images only).
    held_out: bool = field(default=False, metadata={
        "label": "Held-out part", "hidden": True,
        "help": "True: this dataset is the validation_split images held out of the folder, not the others."})

    def validate(self) -> None:
        """Raise one ConfigError listing every invalid setting; changes nothing."""
        wrong_types = type_problems(self)
        if wrong_types:  # the other checks compare numbers and strings: they need the right types first
            raise ConfigError(wrong_types)
        problems = [*_size_problems(self), *_choice_problems(self), *_range_problems(self)]
        if not self.data_dir.strip():
            problems.append("data_dir is empty; choose the folder that holds the training images")
        problems.extend(word_regex_problems(self.filename_word_regex))
        try:
            resolve_template(self.template)
        except ConfigError as exc:
            problems.extend(exc.problems)
        if problems:
            raise ConfigError(problems)


MAX_SIZE = 4096  # pixels per side: twice SDXL's native size; beyond it no consumer device holds one step


def _size_problems(config: DatasetConfig) -> list[str]:
    problems = []
    for name in ("width", "height"):
        value = getattr(config, name)
        if value < 64 or value > MAX_SIZE or value % 8:
            problems.append(f"{name} is {value}; use a whole number of pixels from 64 to {MAX_SIZE}, a multiple of 8")
    return problems


def _choice_problems(config: DatasetConfig) -> list[str]:
    problems = []
    for item in fields(config):
        choices = item.metadata.get("choices")
        value = getattr(config, item.name)
        if choices and value not in choices:
            problems.append(f"{item.name} is '{value}'; choose one of {', '.join(choices)}")
    return problems


def _range_problems(config: DatasetConfig) -> list[str]:
    problems = []
    if config.batch_size < 1:
        problems.append(f"batch_size is {config.batch_size}; use 1 or more")
    if config.repeats < 1:
        problems.append(f"repeats is {config.repeats}; use 1 or more")
    if config.keep_tags < 0:
        problems.append(f"keep_tags is {config.keep_tags}; use 0 or more")
    if config.validation_split < 0:
        problems.append(f"validation_split is {config.validation_split}; use 0 (none) or a number of images")
    if config.validation_split > 0 and config.validation_dir.strip():
        problems.append("validation_dir and validation_split are both set; the validation set is one or the other: "
                        "clear one of them")
    for name in ("flip_p", "tag_dropout"):
        value = getattr(config, name)
        if not 0.0 <= value <= 1.0:
            problems.append(f"{name} is {value}; use a probability between 0 and 1")
    return problems
