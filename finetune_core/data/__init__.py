"""Image+caption datasets: scanning, captions, templates, transforms, buckets, caches, lint."""

from finetune_core.data.cache import LatentCache, TextCache, latent_key
from finetune_core.data.data_batch import DataBatch, TrainingData
from finetune_core.data.dataset import ImageDataset
from finetune_core.data.dataset_config import DatasetConfig
from finetune_core.data.lint import LintReport, LintRow, lint_dataset
from finetune_core.data.templates import available_templates, load_template, resolve_template

__all__ = [
           "DataBatch",
           "DatasetConfig",
           "ImageDataset",
           "LatentCache",
           "LintReport",
           "LintRow",
           "TextCache",
           "TrainingData",
           "available_templates",
           "latent_key",
           "lint_dataset",
           "load_template",
           "resolve_template",
]
