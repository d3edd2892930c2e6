"""Dataset lint: what training will see, checked before it starts, as rows a UI can show and a text a CLI prints."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from finetune_core.data.buckets import RESIZE_BUCKETS, Size, make_buckets, target_size
from finetune_core.data.dataset_config import DatasetConfig
from finetune_core.data.scan import caption_warnings, find_files, scan_dataset
from finetune_core.data.templates import load_template, render_prompt

CHUNK_TOKENS = 75  # one CLIP chunk: longer prompts are split into several chunks


@dataclass
class LintRow:
    """One readable image as training will use it."""

    path: Path
    size: Size  # (width, height) of the upright image
    caption: str
    caption_source: str  # "txt" or "filename"
    bucket: Size  # (width, height) it trains at
    tokens: int | None  # tokens of its longest prompt, when a token counter was given
    problems: list[str] = field(default_factory=list)


@dataclass
class LintReport:
    """Everything lint found, per image and in total."""

    folder: Path
    rows: list[LintRow]
    unreadable: list[tuple[Path, str]]
    warnings: list[str] = field(default_factory=list)

    @property
    def images_found(self) -> int:
        return len(self.rows) + len(self.unreadable)

    @property
    def missing_captions(self) -> int:
        return sum(1 for row in self.rows if row.caption_source != "txt")

    @property
    def too_small(self) -> int:
        return sum(1 for row in self.rows if row.size[0] < row.bucket[0] or row.size[1] < row.bucket[1])

    @property
    def too_long(self) -> int:
        return sum(1 for row in self.rows if row.tokens is not None and row.tokens > CHUNK_TOKENS)

    @property
    def buckets(self) -> dict[Size, int]:
        return dict(sorted(Counter(row.bucket for row in self.rows).items()))

    def format(self) -> str:
        """A human-readable summary, then one line per image: size -> bucket, caption source, tokens, problems."""
        counts = (f"  unreadable: {len(self.unreadable)}, missing captions: {self.missing_captions}, "
                  f"smaller than the training size: {self.too_small}, "
                  f"longer than {CHUNK_TOKENS} tokens: {self.too_long}")
        buckets = ", ".join(f"{w}x{h}: {n}" for (w, h), n in self.buckets.items())
        lines = [f"Dataset {self.folder}: {self.images_found} images found, {len(self.rows)} readable",
                 counts, f"  buckets: {buckets}"]
        lines += [f"  warning: {text}" for text in self.warnings]
        lines += [f"  unreadable {path}: {reason}" for path, reason in self.unreadable]
        for row in self.rows:
            tokens = "" if row.tokens is None else f", {row.tokens} tokens"
            problems = f" -- {'; '.join(row.problems)}" if row.problems else ""
            lines.append(f"  {row.path.name}: {row.size[0]}x{row.size[1]} -> bucket {row.bucket[0]}x{row.bucket[1]}, "
                         f"caption from {row.caption_source}{tokens}{problems}")
        return "\n".join(lines)


def lint_dataset(config: DatasetConfig, token_counter: Callable[[str], int] | None = None) -> LintReport:
    """Check a dataset before training; `token_counter` is e.g. `model.count_tokens`. Bad settings raise."""
    config.validate()
    folder = Path(config.data_dir)
    scan = scan_dataset(folder, config.recursive, config.filename_word_regex, config.filename_join_string)
    lines = load_template(config.template)
    buckets = make_buckets(config.width, config.height) if config.resize_mode == RESIZE_BUCKETS else None
    placeholder = config.placeholder or "*"
    rows = []
    for record in scan.records:
        size = (record.width, record.height)
        bucket = target_size(config.resize_mode, size, (config.width, config.height), buckets)
        tokens = None
        if token_counter is not None:
            tokens = max(token_counter(render_prompt(line, placeholder, record.caption)) for line in lines)
        rows.append(LintRow(record.path, size, record.caption, record.caption_source, bucket, tokens,
                            [*_problems(record.caption, record.caption_source, size, bucket, tokens),
                             *record.caption_notes]))
    return LintReport(folder, rows, scan.unreadable, _warnings(config, scan.records, scan.unreadable, lines))


def _problems(caption: str, source: str, size: Size, bucket: Size, tokens: int | None) -> list[str]:
    problems = []
    if source != "txt":
        problems.append("no .txt caption; the caption comes from the file name")
    if not caption.strip():
        problems.append("the caption is empty")
    if size[0] < bucket[0] or size[1] < bucket[1]:
        problems.append(f"smaller than its training size {bucket[0]}x{bucket[1]}; it will be upscaled")
    if tokens is not None and tokens > CHUNK_TOKENS:
        problems.append(f"its longest prompt takes {tokens} tokens, more than one {CHUNK_TOKENS}-token chunk")
    return problems


def _warnings(config: DatasetConfig, records: list, unreadable: list, lines: list[str]) -> list[str]:
    warnings = [f"{path.name} cannot be read and will be skipped" for path, _ in unreadable]
    warnings += caption_warnings(records)
    if config.batch_size > len(records):
        warnings.append(f"the batch size {config.batch_size} is larger than the {len(records)} readable images; "
                        f"training will refuse to start")
    if not any("[filewords]" in line for line in lines) and any(r.caption_source == "txt" for r in records):
        warnings.append(f"the template {config.template} has no [filewords], so the captions are not used")
    _, _, others = find_files(Path(config.data_dir), config.recursive)
    if others:
        warnings.append(f"{others} file(s) that are neither images nor .txt captions are ignored")
    return warnings


def small_image_warnings(records: list, config: DatasetConfig) -> list[str]:
    """One sentence naming the images smaller than their training size (lint's per-image problem, for the run):
    they are upscaled, and a tiny one (1x1) teaches little but blur."""
    buckets = make_buckets(config.width, config.height) if config.resize_mode == RESIZE_BUCKETS else None
    small = []
    for record in records:
        size = (record.width, record.height)
        bucket = target_size(config.resize_mode, size, (config.width, config.height), buckets)
        if size[0] < bucket[0] or size[1] < bucket[1]:
            small.append(f"{record.path.name} ({size[0]}x{size[1]}, trained at {bucket[0]}x{bucket[1]})")
    if not small:
        return []
    more = f" and {len(small) - 5} more" if len(small) > 5 else ""
    return [f"{len(small)} image(s) are smaller than their training size and will be upscaled: "
            f"{', '.join(small[:5])}{more}; use larger images or a smaller training size"]
