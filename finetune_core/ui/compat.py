"""The few places where Gradio 3.41 (WebUI) and Gradio 4.x (Forge, standalone) differ, in one module."""

from __future__ import annotations

import re
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
    """Gradio 4's page template, made to work offline and under Starlette >= 1.

    Starlette 1.x dropped `TemplateResponse(name, context)`, which Gradio 4.44 still calls (it read the name as the
    request and failed on every page load). The page also loads a script from cdnjs (iframe-resizer, for embedding
    in another page): offline the page would wait on it, so it is taken out. Only Gradio's own template object is
    wrapped (an instance attribute), once.
    """
    import inspect

    from gradio import routes

    templates = routes.templates
    if getattr(templates, "_finetune_wrapped", False):
        return
    original = type(templates).TemplateResponse
    new_form = next(iter(list(inspect.signature(original).parameters)[1:]), "") == "request"

    def template_response(*args: Any, **kwargs: Any) -> Any:
        if new_form and args and isinstance(args[0], str):  # the pre-1.0 form: (name, context, ...)
            name, context, *rest = args
            response = original(templates, context["request"], name, context, *rest, **kwargs)
        else:
            response = original(templates, *args, **kwargs)
        return without_remote_scripts(response)

    templates.TemplateResponse = template_response  # type: ignore[method-assign]
    templates._finetune_wrapped = True  # type: ignore[attr-defined]


REMOTE_SCRIPT = re.compile(rb"<script[^>]*\ssrc=\"https?://[^\"]*\"[^>]*>\s*</script>"
                           rb"|<link[^>]*rel=\"preconnect\"[^>]*href=\"https?://[^\"]*\"[^>]*/?>", re.IGNORECASE)


def without_remote_scripts(response: Any) -> Any:
    """The rendered page without <script src="http..."> and preconnect tags (it must not wait on the internet)."""
    body = getattr(response, "body", None)
    if not isinstance(body, bytes) or b"<script" not in body:
        return response
    cleaned = REMOTE_SCRIPT.sub(b"", body)
    if cleaned != body:
        response.body = cleaned
        response.headers["content-length"] = str(len(cleaned))
    return response


OFFLINE_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # the machine's own: no Google Fonts request
OFFLINE_MONO_FONTS = ["ui-monospace", "Consolas", "monospace"]


def offline_theme(gr: Any) -> Any:
    """Gradio 4's default theme with the machine's fonts (the default loads two fonts from Google)."""
    return gr.themes.Default(font=OFFLINE_FONTS, font_mono=OFFLINE_MONO_FONTS)
