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


# Our events are UI plumbing, not a public Gradio API (the REST routes are): keeping them out of the API info also
# avoids Gradio 4.44's schema walker, which crashes on the File/Gallery schemas under pydantic >= 2.11.
NO_API: dict[str, Any] = {"api_name": False}


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


def fix_gradio4_templates() -> None:
    """Let Gradio 4's page template work under Starlette >= 1, which dropped `TemplateResponse(name, context)`.

    Gradio 4.44 still calls the old form; Starlette 1.x reads the name as the request and fails on every page
    load. Only Gradio's own template object is wrapped (an instance attribute), and only when it needs it.
    """
    import inspect

    from gradio import routes

    templates = routes.templates
    original = type(templates).TemplateResponse
    if next(iter(list(inspect.signature(original).parameters)[1:]), "") != "request":
        return
    if getattr(templates, "_finetune_wrapped", False):
        return

    def template_response(*args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], str):  # the pre-1.0 form: (name, context, ...)
            name, context, *rest = args
            return original(templates, context["request"], name, context, *rest, **kwargs)
        return original(templates, *args, **kwargs)

    templates.TemplateResponse = template_response  # type: ignore[method-assign]
    templates._finetune_wrapped = True  # type: ignore[attr-defined]
