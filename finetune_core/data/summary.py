"""What a training set was, as artefacts record it: images per folder, caption tags, the sizes trained.

LoRA files carry it as kohya's `ss_dataset_dirs`, `ss_tag_frequency` and `ss_bucket_info`, which the WebUI's Lora
cards show as "Dataset size", the tag list (and its random-prompt button) and "Resolutions".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from finetune_core.data.buckets import Size
from finetune_core.data.scan import ImageRecord


@dataclass(frozen=True)
class DatasetSummary:
    """images: how many images each folder (by name) gave; tags: per folder, each comma-separated caption tag
    (lower case, as kohya counts them) and how often the captions hold it; sizes: each trained (width, height) and
    how many images train at it; resolution: the configured training size; class_images: prior-preservation
    images; buckets: whether aspect buckets chose the sizes."""

    images: dict[str, int]
    tags: dict[str, dict[str, int]]
    sizes: dict[Size, int]
    resolution: Size
    repeats: int = 1
    class_images: int = 0
    buckets: bool = False

    @property
    def total_images(self) -> int:
        return sum(self.images.values())


@dataclass
class _Folder:
    images: int = 0
    tags: Counter[str] = field(default_factory=Counter)


def caption_tags(caption: str) -> list[str]:
    """The comma-separated tags of a caption, stripped and lower case; empty pieces dropped."""
    return [tag for tag in (piece.strip().lower() for piece in caption.split(",")) if tag]


def summarize(records: Iterable[ImageRecord], sizes: Iterable[Size], resolution: Size, repeats: int = 1,
              buckets: bool = False) -> DatasetSummary:
    """The summary of `records`, trained at `sizes` (one per record, in the same order)."""
    folders: dict[str, _Folder] = {}
    for record in records:
        folder = folders.setdefault(record.path.parent.name, _Folder())
        folder.images += 1
        folder.tags.update(caption_tags(record.caption))
    return DatasetSummary(images={name: f.images for name, f in folders.items()},
                          tags={name: dict(f.tags) for name, f in folders.items()},
                          sizes=dict(Counter(sizes)), resolution=resolution, repeats=repeats, buckets=buckets)
