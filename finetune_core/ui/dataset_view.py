"""HTML for the Dataset section's preview: the lint table with original and crop thumbnails, and the step maths."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from finetune_core.data.transforms import plan_crop

THUMB = 96  # thumbnail edge in pixels
MAX_ROWS = 64  # rows with thumbnails; a larger dataset is summarised, not rendered in full


def _get(row: Any, key: str, default: Any = None) -> Any:
    return row.get(key, default) if isinstance(row, dict) else getattr(row, key, default)


def steps_arithmetic(n_images: int, repeats: int, batch_size: int, accumulation: int, steps: int) -> str:
    """'images × repeats × epochs / batch = steps', the way the user plans a run (epochs may be fractional)."""
    if n_images <= 0:
        return "No images: nothing to train on."
    per_step = max(1, batch_size) * max(1, accumulation)
    samples = n_images * max(1, repeats)
    steps_per_epoch = math.ceil(samples / per_step)
    epochs = steps / steps_per_epoch if steps_per_epoch else 0.0
    batch_text = f"batch {batch_size}" + (f" × accumulation {accumulation}" if accumulation > 1 else "")
    return (f"{n_images} images × {max(1, repeats)} repeats × {epochs:.2f} epochs / {batch_text} = {steps} steps "
            f"({steps_per_epoch} steps per epoch)")


def lint_html(report: Any, crop: str = "center", with_thumbnails: bool = True) -> str:
    """The lint report as a table: thumbnail, crop preview at its bucket, caption, tokens, problems."""
    rows = list(_get(report, "rows", []) or [])
    summary = html.escape(report.format()) if hasattr(report, "format") else ""
    body = "".join(_row_html(row, crop, with_thumbnails and i < MAX_ROWS) for i, row in enumerate(rows))
    more = f"<div>… and {len(rows) - MAX_ROWS} more without thumbnails.</div>" if len(rows) > MAX_ROWS else ""
    return (f"<div class='finetune-lint'><pre class='finetune-lint-summary'>{summary}</pre>"
            "<table class='finetune-lint-table'><thead><tr><th>Image</th><th>Crop at bucket</th><th>File</th>"
            "<th>Size → bucket</th><th>Caption</th><th>Tokens</th><th>Problems</th></tr></thead>"
            f"<tbody>{body}</tbody></table>{more}</div>")


def _row_html(row: Any, crop: str, thumbs: bool) -> str:
    path = Path(str(_get(row, "path", "")))
    size, bucket = _get(row, "size"), _get(row, "bucket")
    problems = _get(row, "problems", []) or []
    original, cropped = (_thumbnails(path, size, bucket, crop) if thumbs else ("", ""))
    size_text = f"{_wh(size)} → {_wh(bucket)}"
    problem_text = "<br>".join(html.escape(str(p)) for p in problems) or "ok"
    css = "finetune-lint-bad" if problems else "finetune-lint-ok"
    return (f"<tr class='{css}'><td>{original}</td><td>{cropped}</td><td>{html.escape(path.name)}</td>"
            f"<td>{size_text}</td><td>{html.escape(str(_get(row, 'caption', '') or ''))}</td>"
            f"<td>{html.escape(str(_get(row, 'tokens', '')))}</td><td>{problem_text}</td></tr>")


def _wh(size: Any) -> str:
    if not size:
        return "?"
    return f"{size[0]}×{size[1]}"


def _thumbnails(path: Path, size: Any, bucket: Any, crop: str) -> tuple[str, str]:
    """(original thumbnail, crop-at-bucket thumbnail) as <img> tags with data URIs; empty strings when unreadable."""
    try:
        with Image.open(path) as opened:
            turned = ImageOps.exif_transpose(opened)  # None only with in_place=True
            image = (turned if turned is not None else opened).convert("RGB")
    except (OSError, ValueError):
        return "", ""
    original = _img_tag(image, "original")
    if not bucket:
        return original, ""
    plan = plan_crop(image.size, (int(bucket[0]), int(bucket[1])), crop, None)
    resized = image.resize((plan.resized_w, plan.resized_h), Image.Resampling.BICUBIC)  # Pillow >= 9.1, so 9.5 and 10+
    cropped = resized.crop((plan.left, plan.top, plan.left + plan.width, plan.top + plan.height))
    return original, _img_tag(cropped, "crop")


def _img_tag(image: Image.Image, what: str) -> str:
    thumb = image.copy()
    thumb.thumbnail((THUMB, THUMB))
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=80)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img class='finetune-thumb finetune-thumb-{what}' src='data:image/jpeg;base64,{data}' alt='{what}'>"
