"""A folder of class images for prior preservation: the user's own images, and images the model generated, listed
in a small manifest (`class_images.json`) under the settings that made them, so they are reused only when those
settings (model, prompt, sampler, size, ...) match and are never made again when they do.

Generated images are named `<key>-<index>.png`, the key being a hash of their settings; images of other settings
stay in the folder untouched (nothing on disk is lost) but are not used. Any image the manifest does not list is the
user's own and is always used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_core.data.scan import ImageRecord, scan_dataset
from finetune_core.data.transforms import IMAGE_EXTENSIONS
from finetune_core.errors import DatasetError
from finetune_core.formats.atomic import atomic_write

logger = logging.getLogger(__name__)

MANIFEST = "class_images.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class ClassImageRequest:
    """How class images are made: the generation settings and the model that makes them."""

    prompt: str
    negative_prompt: str
    steps: int
    cfg_scale: float
    sampler: str
    seed: int
    width: int
    height: int
    model_name: str = ""
    model_hash: str = ""

    def key(self) -> str:
        """10 hex digits naming these settings (file names, manifest entries)."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def _generated_name(key: str) -> re.Pattern[str]:
    return re.compile(re.escape(key) + r"-(\d+)\.png$")


class ClassFolder:
    """The class images of one folder; `read_manifest` refuses a damaged manifest with a sentence."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.manifest_path = self.folder / MANIFEST

    def read_manifest(self) -> dict[str, Any]:
        """{key: {settings..., "images": [file names]}}; empty when the folder has no manifest yet."""
        if not self.manifest_path.is_file():
            return {}
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            sets = data["sets"]
            if not isinstance(sets, dict) or not all(isinstance(v.get("images"), list) for v in sets.values()):
                raise ValueError("no image lists")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DatasetError(f"the class image manifest {self.manifest_path} is damaged ({exc}); delete it (the "
                               f"images there then count as your own class images) or choose another class "
                               f"folder") from exc
        return sets

    def listed(self) -> set[str]:
        """File names of every generated image the manifest lists, whatever made it."""
        return {name for entry in self.read_manifest().values() for name in entry["images"]}

    def own_images(self) -> list[Path]:
        """The user's own images: every image in the folder the manifest does not list (sorted)."""
        if not self.folder.is_dir():
            return []
        listed = self.listed()
        return sorted(p for p in self.folder.iterdir() if p.is_file() and not p.name.startswith(".")
                      and p.suffix.lower() in IMAGE_EXTENSIONS and p.name not in listed)

    def generated(self, request: ClassImageRequest) -> dict[int, Path]:
        """Index -> file of the images made with exactly `request` that are still there."""
        entry = self.read_manifest().get(request.key(), {})
        pattern = _generated_name(request.key())
        found = {}
        for name in entry.get("images", []):
            match = pattern.match(name)
            if match and (self.folder / name).is_file():
                found[int(match.group(1))] = self.folder / name
        return dict(sorted(found.items()))

    def save(self, request: ClassImageRequest, images: list[Any], first_index: int) -> list[Path]:
        """Write generated PIL images as `<key>-<index>.png` (each with its prompt as caption) and list them in the
        manifest, so an interrupted generation keeps what it made."""
        self.folder.mkdir(parents=True, exist_ok=True)
        key, written = request.key(), []
        for offset, image in enumerate(images):
            path = self.folder / f"{key}-{first_index + offset:05d}.png"
            atomic_write(path, _png_writer(image), overwrite=True)
            caption = path.with_suffix(".txt")
            atomic_write(caption, lambda tmp: tmp.write_text(request.prompt, encoding="utf-8"), overwrite=True)
            written.append(path)
        sets = self.read_manifest()
        entry = sets.setdefault(key, {**dataclasses.asdict(request), "images": []})
        entry["images"] = sorted(set(entry["images"]) | {p.name for p in written})
        text = json.dumps({"format": MANIFEST_FORMAT, "sets": sets}, indent=1, sort_keys=True)
        atomic_write(self.manifest_path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)
        return written

    def usable(self, request: ClassImageRequest, count: int) -> list[Path]:
        """The class images a run with `request` uses: the user's own first, then the matching generated ones, at
        most `count` of them."""
        return (self.own_images() + list(self.generated(request).values()))[:count]


def _png_writer(image: Any) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        image.save(tmp, format="PNG")
    return write


def class_records(folder: Path, paths: list[Path]) -> list[ImageRecord]:
    """Scan the class folder and keep the records of `paths` (in that order); unreadable ones are named."""
    scan = scan_dataset(Path(folder))
    by_path = {record.path: record for record in scan.records}
    broken = {path: why for path, why in scan.unreadable}
    bad = [f"{p.name} ({broken[p]})" for p in paths if p in broken]
    if bad:
        raise DatasetError(f"class images in {folder} cannot be read: {', '.join(bad)}; replace or remove them")
    return [by_path[p] for p in paths if p in by_path]


def check_own_images(folder: Path, width: int, height: int) -> None:
    """Refuse the user's own class images that cannot be read or are smaller than the training size (they would
    be scaled up, and a blurred prior teaches the model blur), naming them."""
    own = ClassFolder(folder).own_images()
    if not own:
        return
    scan = scan_dataset(Path(folder))
    mine = set(own)
    unreadable = [f"{p.name} ({why})" for p, why in scan.unreadable if p in mine]
    if unreadable:
        raise DatasetError(f"the class folder {folder} holds images that cannot be read: {', '.join(unreadable)}; "
                           f"replace or remove them")
    small = [f"{r.path.name} ({r.width}x{r.height})" for r in scan.records
             if r.path in mine and (r.width < width or r.height < height)]
    if small:
        raise DatasetError(f"the class folder {folder} holds images smaller than the training size {width}x{height}: "
                           f"{', '.join(small[:5])}{' ...' if len(small) > 5 else ''}; remove them, or point the "
                           f"class folder elsewhere (an empty folder is filled with generated images)")
