"""Instance images paired with class images (prior preservation, methods.md §6.1): every micro-batch holds the
instance batch followed by as many class images of the same size, so one UNet pass serves both loss terms;
`DataBatch.extras["is_class"]` tells them apart.

The class images are made into a dataset per instance size (a fixed size, or each aspect bucket) and encoded on
first use, as the instance images are. Which class image a sample gets is a pure function of the run seed and the
sample number (each class image once per round, in a shuffled order), so a resumed run sees the same pairs.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from finetune_core.data.buckets import Size
from finetune_core.data.data_batch import DataBatch
from finetune_core.data.dataset import ImageDataset, derived_seed
from finetune_core.data.scan import ImageRecord
from finetune_core.data.summary import DatasetSummary
from finetune_core.errors import DatasetError

if TYPE_CHECKING:
    from finetune_core.model.interface import DiffusionModel

IS_CLASS = "is_class"


class PairedDataset:
    """Implements TrainingData: `instances` batches, each followed by class images from `class_records()`.

    class_records: called at `prepare` (after the method's preparation made the class images) for the images to
    use; class_lines: the class prompt line(s), `[filewords]` being each class image's caption.
    """

    def __init__(self, instances: ImageDataset, class_records: Callable[[DiffusionModel], list[ImageRecord]],
                 class_lines: list[str]) -> None:
        self.instances = instances
        self.batch_size = instances.batch_size
        self.records = instances.records
        self._class_records = class_records
        self._class_lines = class_lines
        self._by_size: dict[Size, ImageDataset] = {}
        self._count = 0

    def prepare(self, model: DiffusionModel, on_progress: Callable[[int, int], None] | None = None) -> None:
        """Find the class images and make a dataset of them at every instance size; like the instance images, each
        is encoded the first time a batch draws it."""
        records = self._class_records(model)
        if not records:
            raise DatasetError("prior preservation has no class images to train with; generate some (a class "
                               "image count above 0) or put images into the class folder")
        self.instances.prepare(model)
        base = self.instances.config
        for width, height in sorted(self.instances.groups):
            config = dataclasses.replace(base, data_dir=str(records[0].path.parent), width=width, height=height,
                                         resize_mode="fixed", batch_size=1, repeats=1, use_alpha_weight=False,
                                         recursive=False)
            dataset = ImageDataset(config, placeholder="", lines=self._class_lines, records=records)
            dataset.prepare(model)
            self._by_size[(width, height)] = dataset
        self._count = len(records)

    def batches_per_epoch(self) -> int:
        return self.instances.batches_per_epoch()

    def summary(self) -> DatasetSummary:
        return dataclasses.replace(self.instances.summary(), class_images=self._count)

    def class_indices(self, seed: int, first: int, count: int) -> list[int]:
        """The class images of samples first..first+count-1: each image once per round, rounds shuffled."""
        out = []
        for sample in range(first, first + count):
            round_, position = divmod(sample, self._count)
            order = list(range(self._count))
            random.Random(derived_seed("class", seed, round_)).shuffle(order)
            out.append(order[position])
        return out

    def get_batch(self, index: int, seed: int) -> DataBatch:
        """Micro-batch `index`: its instance samples, then as many class samples of the same size."""
        if not self._by_size:
            raise RuntimeError("PairedDataset.prepare(model) must run before get_batch")
        inst = self.instances.get_batch(index, seed)
        height, width = (int(v) for v in inst.size_cond[0, 4:6])
        classes = self._by_size[(width, height)]
        chosen = self.class_indices(seed, index * self.batch_size, len(inst))
        cls = classes.batch_of(chosen, seed, index, first_slot=len(inst))
        return join(inst, cls)


def join(inst: DataBatch, cls: DataBatch) -> DataBatch:
    """One batch of instance then class samples, flagged in `extras["is_class"]`."""
    def both(a: torch.Tensor | None, b: torch.Tensor | None, fill: float) -> torch.Tensor | None:
        if a is None and b is None:
            return None
        a = a if a is not None else torch.full_like(b, fill)  # type: ignore[arg-type]
        b = b if b is not None else torch.full_like(a, fill)
        return torch.cat([a, b])

    extras = {key: list(inst.extras.get(key, [])) + list(cls.extras.get(key, [])) for key in inst.extras}
    extras[IS_CLASS] = [False] * len(inst) + [True] * len(cls)
    return DataBatch(latents=torch.cat([inst.latents, cls.latents]), prompts=inst.prompts + cls.prompts,
                     size_cond=torch.cat([inst.size_cond, cls.size_cond]),
                     loss_weight=both(inst.loss_weight, cls.loss_weight, 1.0),
                     pixels=both(inst.pixels, cls.pixels, 0.0),
                     image_paths=inst.image_paths + cls.image_paths, extras=extras)
