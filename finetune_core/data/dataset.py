"""ImageDataset: a folder of captioned images as deterministic training batches, each image encoded on first use."""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from finetune_core.data.buckets import RESIZE_BUCKETS, Size, make_buckets, target_size
from finetune_core.data.cache import LatentCache, encoder_identity, latent_key
from finetune_core.data.captions import augment_caption
from finetune_core.data.data_batch import DataBatch
from finetune_core.data.dataset_config import DatasetConfig
from finetune_core.data.masks import load_mask, mask_weight
from finetune_core.data.scan import ImageRecord, scan_dataset
from finetune_core.data.summary import DatasetSummary, summarize
from finetune_core.data.templates import draw_line, load_template, render_prompt
from finetune_core.data.transforms import (
    CropPlan,
    alpha_weight,
    apply_plan,
    flipped_crop_left,
    load_image,
    plan_crop,
    to_model_range,
)
from finetune_core.errors import DatasetError

if TYPE_CHECKING:
    from finetune_core.model.interface import DiffusionModel, LatentMoments

__all__ = ["DatasetConfig", "ImageDataset", "PreparedSample"]

logger = logging.getLogger(__name__)

Entry = tuple[int, int]  # (record index, repeat number)


@dataclass
class PreparedSample:
    """One image in one orientation, ready to batch: latent (or its moments), optional weight and pixels."""

    mean: torch.Tensor  # (4, h, w); for "once" the stored sample, for "deterministic" the mean
    std: torch.Tensor | None  # only for "random" latent sampling
    weight: torch.Tensor | None  # (1, h, w) alpha loss weight
    pixels: torch.Tensor | None  # (3, H, W) in [-1, 1]


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any values, stable across processes (unlike hash())."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def split_records(records: list[ImageRecord], held: int, held_out: bool) -> list[ImageRecord]:
    """The training part of a folder (all but `held` images) or, `held_out`, the `held` images kept for the
    validation loss: those with the lowest content hashes, so the same images whatever their names or order."""
    if held <= 0:
        return records
    if held >= len(records):
        raise DatasetError(f"validation_split {held} leaves no image to train on: the dataset has {len(records)} "
                           f"readable image(s); hold out fewer")
    chosen = {id(r) for r in sorted(records, key=lambda r: (r.content_hash, str(r.path)))[:held]}
    return [r for r in records if (id(r) in chosen) == held_out]


class ImageDataset:
    """Implements TrainingData over a folder; `get_batch(index, seed)` is a pure function of its arguments.

    lines: prompt lines to use instead of the config's template (e.g. one fixed prompt); records: the images to
    use instead of scanning `config.data_dir` (a chosen part of a folder).
    """

    def __init__(self, config: DatasetConfig, placeholder: str | None = None, cache: LatentCache | None = None,
                 lines: list[str] | None = None, records: list[ImageRecord] | None = None) -> None:
        config.validate()
        self.config = config
        self.placeholder = placeholder if placeholder is not None else config.placeholder
        self.batch_size = config.batch_size
        self.lines = list(lines) if lines else load_template(config.template)
        if records is None:
            scan = scan_dataset(Path(config.data_dir), config.recursive, config.filename_word_regex,
                                config.filename_join_string)
            records, self.unreadable = scan.records, scan.unreadable
            records = split_records(records, config.validation_split, config.held_out)
        else:
            self.unreadable = []
        self.records: list[ImageRecord] = list(records)
        self._buckets = make_buckets(config.width, config.height) if config.resize_mode == RESIZE_BUCKETS else None
        if config.batch_size > len(self.records):
            raise DatasetError(f"the batch size {config.batch_size} is larger than the dataset: {config.data_dir} "
                               f"has {len(self.records)} readable image{'s' if len(self.records) != 1 else ''}; "
                               f"lower the batch size to {len(self.records)} or add images")
        self.plans = [self._plan(record) for record in self.records]
        self.groups = self._group_by_size()
        self.cache = cache if cache is not None else LatentCache(Path(config.cache_dir) if config.cache_dir else None)
        self._samples: list[dict[bool, PreparedSample]] | None = None  # per image, by flip: filled on first use
        self._model: DiffusionModel | None = None
        self._vae_id = ""
        self._memo: dict[tuple[int, int], list[list[Entry]]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def _plan(self, record: ImageRecord) -> CropPlan:
        """Resize and crop box of an image, fixed for the run.

        A random crop is seeded by the crop seed and the image's content, not its position in the folder, so
        adding an image leaves the other crops (and their cached latents) as they were.
        """
        cfg = self.config
        size = target_size(cfg.resize_mode, (record.width, record.height), (cfg.width, cfg.height), self._buckets)
        rng = random.Random(derived_seed("crop", cfg.crop_seed, record.content_hash))
        return plan_crop((record.width, record.height), size, cfg.crop, rng)

    def _group_by_size(self) -> dict[Size, list[int]]:
        groups: dict[Size, list[int]] = {}
        for index, plan in enumerate(self.plans):
            groups.setdefault((plan.width, plan.height), []).append(index)
        return groups

    def summary(self) -> DatasetSummary:
        cfg = self.config
        return summarize(self.records, [(plan.width, plan.height) for plan in self.plans], (cfg.width, cfg.height),
                         cfg.repeats, self._buckets is not None)

    def flips(self) -> tuple[bool, ...]:
        """The orientations a batch may draw: both when flipping is on."""
        return (False, True) if self.config.flip_p > 0 else (False,)

    # --- prepare ------------------------------------------------------------------------------------------
    def prepare(self, model: DiffusionModel, on_progress: Callable[[int, int], None] | None = None) -> None:
        """Make batches drawable with `model`'s VAE. Nothing is encoded here: a sample's latent is encoded (or read
        from the cache) the first time a batch draws it and kept for the rest of the run, as diffusers' scripts
        encode one batch per step, so the first step waits for its own images only. A latent is a pure function
        of the image, its crop, its flip and the VAE, so the order samples are first drawn in changes nothing (a
        resumed run draws the same latents)."""
        self._model = model
        self._vae_id = encoder_identity(model)
        self._samples = [{} for _ in self.records]

    def _sample(self, index: int, flip: bool) -> PreparedSample:
        """Image `index` in orientation `flip`, encoded on first use."""
        if self._samples is None or self._model is None:
            raise RuntimeError("ImageDataset.prepare(model) must run before get_batch")
        variants = self._samples[index]
        if flip not in variants:
            variants[flip] = self._prepare_one(self._model, self._vae_id, index, flip)
            logger.debug("encoded %s%s (%d latent cache hits, %d encoded so far)", self.records[index].path,
                         " flipped" if flip else "", self.cache.hits, self.cache.misses)
        return variants[flip]

    def _prepare_one(self, model: DiffusionModel, vae_id: str, index: int, flip: bool) -> PreparedSample:
        record, plan, cfg = self.records[index], self.plans[index], self.config
        key = latent_key(record.content_hash, plan, flip, vae_id)
        moments = self.cache.get(key)
        image = None
        if moments is None or cfg.keep_pixels or (cfg.use_alpha_weight and record.has_alpha):
            image = load_image(record.path)
        mask = None
        if cfg.attention_masks and record.mask is not None:  # resized, cropped and flipped as its image
            mask = apply_plan(load_mask(record.mask, (record.width, record.height)), plan, flip)
        pixels = to_model_range(apply_plan(image.rgb, plan, flip)) if image is not None else None
        if moments is None:
            moments = self.cache.put(key, self._encode(model, pixels))
        mean, std = moments.mean[0], moments.std[0]
        weight = None
        if cfg.use_alpha_weight:
            alpha = image.alpha if image is not None else None
            alpha = apply_plan(alpha, plan, flip) if alpha is not None else None
            weight = alpha_weight(alpha, mean.shape[-2], mean.shape[-1])
        if cfg.attention_masks:  # both weights multiply; an image without a mask weighs 1
            area = mask_weight(mask, *mean.shape[-2:]) if mask is not None else torch.ones(1, *mean.shape[-2:])
            weight = area if weight is None else weight * area
        return PreparedSample(*self._sampled(mean, std, key), weight, pixels if cfg.keep_pixels else None)

    @staticmethod
    def _encode(model: DiffusionModel, pixels: torch.Tensor | None) -> LatentMoments:
        if pixels is None:  # never: a cache miss always loads the image first
            raise RuntimeError("no pixels to encode")
        with torch.no_grad():
            return model.encode_images(pixels[None].to(model.device, model.dtype))

    def _sampled(self, mean: torch.Tensor, std: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Apply the latent sampling method: "once" draws its sample from a seed derived from the cache key."""
        mode = self.config.latent_sampling
        if mode == "random":
            return mean, std
        if mode == "deterministic":
            return mean, None
        generator = torch.Generator().manual_seed(derived_seed("once", key))
        return mean + std * torch.randn(mean.shape, generator=generator), None

    # --- batches ------------------------------------------------------------------------------------------
    def batches_per_epoch(self) -> int:
        """Sum over size groups of ceil(entries / batch size); the last batch of a group may be smaller."""
        entries = self.config.repeats
        return sum(math.ceil(len(members) * entries / self.batch_size) for members in self.groups.values())

    def epoch_batches(self, seed: int, epoch: int) -> list[list[Entry]]:
        """The batches of one epoch: (image, repeat) entries shuffled within each size group, batches shuffled."""
        memo_key = (seed, epoch)
        if memo_key not in self._memo:
            rng = random.Random(derived_seed("epoch", seed, epoch))
            batches: list[list[Entry]] = []
            for size in sorted(self.groups):
                entries = [(i, r) for i in self.groups[size] for r in range(self.config.repeats)]
                rng.shuffle(entries)
                batches.extend(entries[k:k + self.batch_size] for k in range(0, len(entries), self.batch_size))
            rng.shuffle(batches)
            # Only the latest epoch is kept: a pure memo, never state that changes what a batch contains.
            self._memo = {memo_key: batches}
        return self._memo[memo_key]

    def get_batch(self, index: int, seed: int) -> DataBatch:
        """Micro-batch `index` of the run for `seed`: the same arguments always give the same batch."""
        if self._samples is None:
            raise RuntimeError("ImageDataset.prepare(model) must run before get_batch")
        epoch, position = divmod(index, self.batches_per_epoch())
        entries = self.epoch_batches(seed, epoch)[position]
        return self.batch_of([entry[0] for entry in entries], seed, index)

    def batch_of(self, record_indices: list[int], seed: int, index: int, first_slot: int = 0) -> DataBatch:
        """The batch of the given images as micro-batch `index` would draw them (prompt, flip, latent sample);
        `first_slot` numbers the samples after others of the same micro-batch, so their draws differ."""
        if self._samples is None:
            raise RuntimeError("ImageDataset.prepare(model) must run before batch_of")
        rows = [self._row(record, seed, index, first_slot + slot) for slot, record in enumerate(record_indices)]
        return DataBatch(
            latents=torch.stack([row[0] for row in rows]),
            prompts=[row[1] for row in rows],
            size_cond=torch.tensor([row[2] for row in rows], dtype=torch.float32),
            loss_weight=torch.stack([row[3] for row in rows]) if self._weighted() else None,
            pixels=torch.stack([row[4] for row in rows]) if self.config.keep_pixels else None,
            image_paths=[str(self.records[record].path) for record in record_indices],
            extras={"flipped": [row[5] for row in rows]},
        )

    def _weighted(self) -> bool:
        return self.config.use_alpha_weight or self.config.attention_masks

    def _row(self, record_index: int, seed: int, index: int, slot: int) -> tuple:
        """One sample's latent, prompt, size conditioning, weight, pixels and flip for this step."""
        cfg, record, plan = self.config, self.records[record_index], self.plans[record_index]
        rng = random.Random(derived_seed("sample", seed, index, slot))
        flip = cfg.flip_p > 0 and rng.random() < cfg.flip_p
        filewords = augment_caption(record.caption, rng, cfg.shuffle_tags, cfg.tag_dropout, cfg.keep_tags)
        prompt = render_prompt(draw_line(self.lines, rng), self.placeholder, filewords)
        sample = self._sample(record_index, flip)
        latent = sample.mean
        if sample.std is not None:
            generator = torch.Generator().manual_seed(derived_seed("noise", seed, index, slot))
            latent = sample.mean + sample.std * torch.randn(sample.mean.shape, generator=generator)
        left = flipped_crop_left(plan) if flip else plan.left
        size_cond = [record.height, record.width, plan.top, left, plan.height, plan.width]
        return latent, prompt, size_cond, sample.weight, sample.pixels, flip
