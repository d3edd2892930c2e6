"""Find the training images of a folder, prove each one decodes, and pair it with its caption."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from finetune_core.data.captions import CAPTION_FROM_TXT, UTF8, caption_file, read_caption
from finetune_core.data.masks import split_masks
from finetune_core.data.transforms import IMAGE_EXTENSIONS, probe_image
from finetune_core.errors import DatasetError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageRecord:
    """One readable training image: where it is, its upright size, its content hash and its caption."""

    path: Path
    width: int
    height: int
    mode: str
    has_alpha: bool
    content_hash: str  # sha256 of the file bytes: the cache key part that notices an edited image
    caption: str
    caption_source: str  # "txt" or "filename"
    caption_encoding: str = ""  # how the .txt caption was decoded ("utf-8", "utf-16", "cp1252", ...)
    mask: Path | None = None  # its attention-mask file `<image>_att.<ext>`, when there is one
    caption_notes: tuple[str, ...] = ()  # what was changed in the caption file's text (cut, control characters)

    @property
    def has_caption_file(self) -> bool:
        return self.caption_source == CAPTION_FROM_TXT


@dataclass
class ScanResult:
    """The images of a dataset folder: readable ones as records, unreadable ones with the reason."""

    folder: Path
    records: list[ImageRecord]
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    text_files: int = 0


def find_files(folder: Path, recursive: bool) -> tuple[list[Path], int, int]:
    """(image files sorted by path, number of .txt files, number of other files) in `folder`; attention-mask files
    (`<image>_att.<ext>`) are neither images nor other files."""
    if not folder.exists():
        raise DatasetError(f"the dataset folder {folder} does not exist; check the path")
    if not folder.is_dir():
        raise DatasetError(f"the dataset path {folder} is a file, not a folder; give the folder of training images")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in candidates if p.is_file() and not p.name.startswith("."))
    pictures = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    images, _masks = split_masks(pictures)
    texts = sum(1 for p in files if p.suffix.lower() == ".txt")
    return images, texts, len(files) - len(pictures) - texts


def attention_masks(folder: Path, recursive: bool) -> dict[Path, Path]:
    """{training image: its attention-mask file} in `folder`."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return split_masks(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)[1]


def image_files(folder: Path, recursive: bool = False) -> tuple[list[Path], int]:
    """(image files, number of .txt files); a DatasetError saying what the folder holds when there is no image.

    Cheap (nothing is decoded), so a request can be checked before a model loads.
    """
    images, texts, others = find_files(folder, recursive)
    if not images:
        has_subfolders = any(p.is_dir() for p in folder.iterdir())
        raise DatasetError(_no_images_message(folder, recursive and has_subfolders, texts, others,
                                              has_subfolders and not recursive))
    return images, texts


def scan_dataset(folder: Path, recursive: bool = False, word_regex: str = "", join_string: str = " ") -> ScanResult:
    """Scan a dataset folder; unreadable images are skipped and named, an unusable folder is a DatasetError."""
    images, texts = image_files(folder, recursive)
    masks = attention_masks(folder, recursive)
    result = ScanResult(folder, [], [], texts)
    for path in images:
        try:
            data = path.read_bytes()
            info = probe_image(data, path)
        except (DatasetError, OSError) as exc:
            reason = str(exc.__cause__ or exc)
            logger.warning("skipping unreadable image %s: %s", path, reason)
            result.unreadable.append((path, reason))
            continue
        caption, source, encoding, notes = read_caption(path, word_regex, join_string)
        for note in notes:
            logger.warning("caption %s: %s", caption_file(path), note)
        result.records.append(ImageRecord(path, info.width, info.height, info.mode, info.has_alpha,
                                          hashlib.sha256(data).hexdigest(), caption, source, encoding,
                                          masks.get(path), notes))
    if not result.records:
        named = ", ".join(f"{p.name} ({why})" for p, why in result.unreadable)
        raise DatasetError(f"none of the {len(images)} images in the dataset folder {folder} could be read: "
                           f"{named}; replace them with valid image files")
    return result


def caption_warnings(records: list[ImageRecord]) -> list[str]:
    """Sentences naming the caption files that were not UTF-8 (decoded anyway; a guess for legacy encodings) and
    those whose text was changed (cut at what the text encoder sees, control characters removed)."""
    warnings = [f"the caption {caption_file(r.path)} was changed: {'; '.join(r.caption_notes)}; shorten or fix it"
                for r in records if r.caption_notes]
    others = [(caption_file(r.path).name, r.caption_encoding) for r in records
              if r.has_caption_file and r.caption_encoding not in UTF8]
    if not others:
        return warnings
    named = ", ".join(f"{name} ({_ENCODING_WORDS.get(enc, enc)})" for name, enc in others)
    return [*warnings, f"{len(others)} caption file(s) are not UTF-8 and were decoded as noted: {named}; check those "
                       f"captions and save them as UTF-8 so every tool reads them the same way"]


_ENCODING_WORDS = {"utf-16": "UTF-16", "utf-32": "UTF-32", "utf-16-le": "UTF-16 without a byte-order mark",
                   "utf-16-be": "UTF-16 without a byte-order mark", "cp1252": "read as Windows-1252/Latin-1",
                   "latin-1": "read as Latin-1"}


def _no_images_message(folder: Path, searched_subfolders: bool, texts: int, others: int, skipped: bool) -> str:
    kinds = "/".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
    where = "with its subfolders " if searched_subfolders else ""
    if texts == 0 and others == 0:
        hint = " (its subfolders are not searched unless 'Search subfolders' is on)" if skipped else ""
        return f"the dataset folder {folder} {where}is empty{hint}; put training images ({kinds}) in it"
    found = []
    if texts:
        found.append(f"{texts} .txt file{'s' if texts != 1 else ''}")
    if others:
        found.append(f"{others} other file{'s' if others != 1 else ''}")
    return (f"the dataset folder {folder} has no images; found {' and '.join(found)}; "
            f"training needs {kinds} images, each optionally with a .txt caption of the same name")
