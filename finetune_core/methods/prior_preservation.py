"""Prior preservation (methods.md §6.1), for any method that trains the model's weights (DreamBooth; LoRA in its
DreamBooth mode): class images made by the model being trained, paired with the instance images in one UNet pass,
and the loss `instance MSE + λ · class MSE`.

How a method uses it (DreamBooth and LoRA do exactly this):
- its config inherits `PriorPreservationSettings` (the fields, their form metadata, `prior_problems()`), listed
  first among the bases so the method's own fields come first in forms:
  `class MyConfig(PriorPreservationSettings, MySettings)`; its own settings declare the instance prompt and token
  with `instance_prompt_field` / `instance_token_field` (one wording everywhere, each method its own default);
- its `MethodSpec`'s `resolve` returns `resolve_class_folder(...)` (the default class folder and the class image
  size filled in, the user's own class images checked, all before any model loads) and its `data` returns
  `paired_images(config, dataset_config, instance_lines(config), placeholder)` (instance images alone when it is
  off);
- its `check(model)` calls `check_class_sampler(settings, model)` (the sampler exists in this host);
- its `prepare(context)` calls `generate_class_images(context, settings)` (missing images made through the host's
  sampler, with progress and interrupt; matching ones reused);
- its `loss` calls `prior_loss(pred, batch, settings.prior_loss_weight)`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune_core.data.class_images import ClassFolder, ClassImageRequest, check_own_images, class_records
from finetune_core.data.dataset import ImageDataset
from finetune_core.data.dataset_config import DatasetConfig
from finetune_core.data.paired import IS_CLASS, PairedDataset
from finetune_core.data.scan import ImageRecord
from finetune_core.errors import ConfigError, DatasetError, StorageError
from finetune_core.model.interface import DiffusionModel, SampleRequest
from finetune_core.train.method import PrepareContext
from finetune_core.train.objective import per_sample_mse
from finetune_core.train.train_batch import TrainBatch

MAX_CLASS_IMAGES = 10_000  # each is sampled before step 1: far past the 200-300 that are common
CLASS_FOLDERS = "class_images"  # under the method's own log folder, one subfolder per class prompt


def _f(default: Any, label: str, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"label": label, "help": help, **extra})


def instance_prompt_field(default: str) -> Any:
    """The instance prompt setting of a method with a DreamBooth mode."""
    return _f(default, "Instance prompt", "The prompt of every instance image: [name] becomes the instance token, "
              "[filewords] the image's caption, e.g. 'a photo of [name] dog'. Empty: the dataset's prompt template.")


def instance_token_field(default: str, when_empty: str = "") -> Any:
    """The instance token setting (what [name] becomes); `when_empty` says what an empty one means, if anything."""
    return _f(default, "Instance token", "A rare word that comes to mean your subject." +
              (f" Empty: {when_empty}." if when_empty else ""))


def instance_lines(settings: Any) -> list[str] | None:
    """The prompt lines of the instance images: the instance prompt, or None for the dataset's template."""
    return [settings.instance_prompt] if settings.instance_prompt.strip() else None


@dataclass(frozen=True)
class PriorPreservationSettings:
    """The prior-preservation fields a method's config inherits."""

    prior_preservation: bool = _f(False, "Prior preservation", "Also train on class images the model makes from "
                                  "the class prompt, so the class keeps its look (less overfitting and drift).")
    class_prompt: str = _f("", "Class prompt", "What the class images show, without the instance token, e.g. "
                           "'a photo of a dog'; [filewords] becomes a class image's caption.")
    class_negative_prompt: str = _f("", "Class negative prompt", "Negative prompt for making class images.",
                                    advanced=True)
    class_images: int = _f(100, "Class images", "How many class images to train with (200-300 is common); missing "
                           "ones are made before step 1 and kept for the next run.")
    class_data_dir: str = _f("", "Class image folder", "Where class images are kept; your own images there are "
                             "used too. Empty: a folder per class prompt in the run logs' class_images/.",
                             advanced=True)
    prior_loss_weight: float = _f(1.0, "Prior loss weight", "λ in instance loss + λ · class loss.",
                                  advanced=True)
    class_steps: int = _f(30, "Class image sampling steps", "", advanced=True)
    class_cfg_scale: float = _f(7.5, "Class image CFG scale", "", advanced=True)
    class_sampler: str = _f("DPM++ 2M", "Class image sampler", "A sampler name as in the WebUI's txt2img.",
                            advanced=True)
    class_seed: int = _f(0, "Class image seed", "Image i gets a seed from this one.", advanced=True)
    class_batch_size: int = _f(4, "Class image batch size", "Images made per sampler call.", advanced=True)
    # Set from the training size when a request is planned (not a form field): class images are made at that size.
    class_width: int = _f(0, "Class image width", "", hidden=True)
    class_height: int = _f(0, "Class image height", "", hidden=True)

    def prior_problems(self) -> list[str]:
        """Every problem of the prior-preservation fields (checked only when it is on)."""
        if not self.prior_preservation:
            return []
        problems = []
        if not self.class_prompt.strip():
            problems.append("prior preservation is on but the class prompt is empty; describe the class (e.g. "
                            "'a photo of a dog') or turn prior preservation off")
        if self.class_images < 1:
            problems.append(f"prior preservation needs class images, but the class image count is "
                            f"{self.class_images}; use 1 or more (200-300 is common) or turn prior preservation off")
        if "[name]" in self.class_prompt:
            problems.append("the class prompt contains [name] (the instance token); class images show the class "
                            "without your subject, so leave it out")
        if self.class_images > MAX_CLASS_IMAGES:
            problems.append(f"class_images is {self.class_images}; use at most {MAX_CLASS_IMAGES} (each is made "
                            f"before training starts)")
        for name, low, high in (("class_steps", 1, 150),
                                ("class_batch_size", 1, 64), ("class_seed", 0, 2**32 - 1)):
            if not low <= getattr(self, name) <= high:
                problems.append(f"{name} must be from {low} to {high}, not {getattr(self, name)}")
        if not 0 <= self.class_cfg_scale <= 30:
            problems.append(f"class_cfg_scale must be from 0 to 30, not {self.class_cfg_scale}")
        if self.prior_loss_weight < 0:
            problems.append(f"prior_loss_weight must be 0 or more, not {self.prior_loss_weight}")
        return problems


def check_class_sampler(settings: PriorPreservationSettings, model: DiffusionModel) -> None:
    """`Method.check`: refuse a class image sampler this host does not have (checked once the model is loaded)."""
    if settings.prior_preservation and settings.class_sampler not in model.sampler_names():
        raise ConfigError(f"the class image sampler {settings.class_sampler!r} is not available here; choose one "
                          f"of {', '.join(model.sampler_names())}")


def class_request(settings: PriorPreservationSettings, model: DiffusionModel) -> ClassImageRequest:
    """The generation settings of the class images, with the model that makes them."""
    return ClassImageRequest(prompt=settings.class_prompt.replace("[filewords]", "").strip(),
                             negative_prompt=settings.class_negative_prompt, steps=settings.class_steps,
                             cfg_scale=settings.class_cfg_scale, sampler=settings.class_sampler,
                             seed=settings.class_seed, width=settings.class_width, height=settings.class_height,
                             model_name=model.identity.name, model_hash=model.identity.shorthash)


def resolve_class_folder(settings: Any, data: DatasetConfig, method_folder: Path) -> Any:
    """`MethodSpec.resolve` of DreamBooth and LoRA: the class folder (default:
    `<method logs>/class_images/<class prompt>`) and the class image size (the training size) filled in; the user's
    own class images checked. Changes nothing on disk."""
    if not settings.prior_preservation:
        return settings
    folder = Path(settings.class_data_dir) if settings.class_data_dir.strip() else \
        Path(method_folder) / CLASS_FOLDERS / _folder_name(settings.class_prompt)
    if folder.exists() and not folder.is_dir():
        raise StorageError(f"the class image folder {folder} is a file; choose a folder")
    check_own_images(folder, data.width, data.height)
    return dataclasses.replace(settings, class_data_dir=str(folder), class_width=data.width,
                               class_height=data.height)


def _folder_name(prompt: str) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", prompt.replace("[filewords]", "")).strip("_").lower()
    return words[:60] or "class"


def generate_class_images(context: PrepareContext, settings: PriorPreservationSettings) -> list[Path]:
    """Make the class images still missing with the host's sampler (batches; progress after each, which raises
    when the job is interrupted: what was made is kept); returns the new files."""
    if not settings.prior_preservation:
        return []
    folder = ClassFolder(Path(settings.class_data_dir))
    request = class_request(settings, context.model)
    have = folder.usable(request, settings.class_images)
    missing = settings.class_images - len(have)
    made: list[Path] = []
    taken = set(folder.generated(request))
    free = [i for i in range(settings.class_images + len(taken)) if i not in taken][:max(0, missing)]
    what = f"class images into {folder.folder}"  # where they go, said in every host's progress line
    context.progress(what, 0, max(0, missing))
    for start in range(0, len(free), settings.class_batch_size):
        indices = free[start:start + settings.class_batch_size]
        images = context.sample(SampleRequest(
            (request.prompt,) * len(indices), (request.negative_prompt,) * len(indices), steps=request.steps,
            cfg_scale=request.cfg_scale, width=request.width, height=request.height,
            seed=request.seed + indices[0], sampler=request.sampler))
        for index, image in zip(indices, images):
            made += folder.save(request, [image], index)
        context.progress(what, len(made), len(free))
    return made


def paired_images(settings: PriorPreservationSettings, data: DatasetConfig, lines: list[str] | None,
                  placeholder: str) -> ImageDataset | PairedDataset:
    """The training data: the instance images (prompt `lines`, else the template), paired with the class images
    when prior preservation is on."""
    instances = ImageDataset(data, placeholder=placeholder, lines=lines)
    if not settings.prior_preservation:
        return instances

    def records(model: DiffusionModel) -> list[ImageRecord]:
        folder = ClassFolder(Path(settings.class_data_dir))
        paths = folder.usable(class_request(settings, model), settings.class_images)
        if not paths:
            raise DatasetError(f"the class folder {settings.class_data_dir} has no class images for this model "
                               f"and class prompt; let them be generated (class image count above 0)")
        return class_records(folder.folder, paths)

    return PairedDataset(instances, records, [settings.class_prompt])


def prior_loss(pred: torch.Tensor, batch: TrainBatch, prior_weight: float) -> torch.Tensor:
    """instance MSE + λ · class MSE, each the mean over its own samples (per-sample alpha and SNR weights kept);
    a batch without class flags gives the plain loss.

    A paired batch holds as many class samples as instance samples (n each of 2n), so the two means are
    (2 / 2n) · (Σ instance + λ Σ class): written that way the loss needs no count of either kind, and a slice of the
    batch (one process of a data-parallel run, which the loop weights by its share) gives its exact part of it,
    also when the slice holds one kind only."""
    per_sample = per_sample_mse(pred, batch.target, batch.loss_weight, batch.snr_weight)
    flags = batch.data.extras.get(IS_CLASS)
    if not flags:
        return per_sample.mean()
    is_class = torch.tensor(flags, device=per_sample.device)
    weights = torch.where(is_class, prior_weight, 1.0).to(per_sample.dtype)
    return 2.0 * (per_sample * weights).sum() / len(flags)
