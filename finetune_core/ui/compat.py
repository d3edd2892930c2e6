"""The few places where Gradio 3.41 (WebUI) and Gradio 4.x (Forge, standalone) differ, in one module."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def gradio_major(gr: Any) -> int:
    """Gradio's major version (3 in the WebUI, 4 in Forge and the standalone app)."""
    try:
        return int(str(getattr(gr, "__version__", "4")).split(".")[0])
    except ValueError:
        return 4


def js_kwargs(gr: Any, js: str | None) -> dict[str, Any]:
    """The keyword that attaches a JS function to an event: `_js=` on Gradio 3, `js=` on Gradio 4."""
    if not js:
        return {}
    return {"_js": js} if gradio_major(gr) < 4 else {"js": js}


def file_path(value: Any) -> str | None:
    """The local path of a gr.File value (a str on Gradio 4, a tempfile wrapper with `.name` on Gradio 3)."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        return str(value)
    if isinstance(value, dict):
        return value.get("path") or value.get("name")
    return getattr(value, "name", None)


def gallery_value(items: list[tuple[Path, str]]) -> list[tuple[str, str]]:
    """Gallery items as (path, caption) tuples, the form both Gradio versions accept."""
    return [(str(path), caption) for path, caption in items]
