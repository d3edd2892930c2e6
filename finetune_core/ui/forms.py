"""FieldSpec -> Gradio component, and whole settings sections (basic fields, then advanced ones in an accordion)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finetune_core.ui.compat import NO_API
from finetune_core.ui.schema import FieldSpec

REFRESH_SYMBOL = "\U0001f504"
ChoicesFn = Callable[[], list[str]]


def component_for(gr: Any, spec: FieldSpec, elem_id: str, choices: list[str] | None = None) -> Any:
    """The Gradio input for one field: Checkbox, Dropdown (choices), Number or Textbox; help shown as `info`."""
    common: dict[str, Any] = {"label": spec.label, "elem_id": elem_id}
    if spec.help:
        common["info"] = spec.help
    if choices is not None:
        value = spec.default if spec.default in choices or spec.default else None
        return gr.Dropdown(choices=choices, value=value, allow_custom_value=True, **common)
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(spec.default), **common)
    if spec.choices:
        return gr.Dropdown(choices=list(spec.choices), value=spec.default, **common)
    if spec.optional and spec.kind in ("int", "float"):
        # A Gradio number box cannot be empty (Gradio 4 sends 0 for it), and empty means "none" here.
        return gr.Textbox(value="" if spec.default is None else str(spec.default), lines=1, **common)
    if spec.kind == "int":
        return gr.Number(value=spec.default, precision=0, **common)
    if spec.kind == "float":
        return gr.Number(value=spec.default, **common)
    return gr.Textbox(value="" if spec.default is None else str(spec.default), lines=1, **common)


def build_section(gr: Any, specs: list[FieldSpec], elem_prefix: str,
                  dynamic: dict[str, ChoicesFn] | None = None, advanced_label: str = "Advanced") -> dict[str, Any]:
    """Render `specs` in the current Gradio context; returns name -> component.

    Fields named in `dynamic` become editable dropdowns filled by the callable, each with a refresh button.
    """
    dynamic = dynamic or {}
    components: dict[str, Any] = {}
    basic = [s for s in specs if not s.advanced]
    advanced = [s for s in specs if s.advanced]
    _render(gr, basic, elem_prefix, dynamic, components)
    if advanced:
        with gr.Accordion(advanced_label, open=False, elem_id=f"{elem_prefix}_advanced"):
            _render(gr, advanced, elem_prefix, dynamic, components)
    return components


PER_ROW = 3  # short fields (numbers, choices, checkboxes) side by side, as the WebUI's own tabs place them
TEXT_PER_ROW = 2  # a row holding a text field holds two fields at most


def _render(gr: Any, specs: list[FieldSpec], elem_prefix: str, dynamic: dict[str, ChoicesFn],
            out: dict[str, Any]) -> None:
    for group in _rows(specs, dynamic):
        if len(group) > 1:
            with gr.Row(elem_classes=["finetune-field-row"]):
                for spec in group:
                    out[spec.name] = component_for(gr, spec, f"{elem_prefix}_{spec.name}")
            continue
        spec = group[0]
        elem_id = f"{elem_prefix}_{spec.name}"
        if spec.name in dynamic:
            with gr.Row(elem_classes=["finetune-refresh-row"]):
                out[spec.name] = component_for(gr, spec, elem_id, dynamic[spec.name]())
                refresh_button(gr, out[spec.name], dynamic[spec.name], f"{elem_id}_refresh")
        else:
            out[spec.name] = component_for(gr, spec, elem_id)


def _rows(specs: list[FieldSpec], dynamic: dict[str, ChoicesFn]) -> list[list[FieldSpec]]:
    """Consecutive fields side by side (width beside height, steps beside batch size, a text beside its count):
    up to PER_ROW short fields a row, or TEXT_PER_ROW where one is a text field; a field with a refresh button
    gets a row of its own."""
    rows: list[list[FieldSpec]] = []
    for spec in specs:
        row = rows[-1] if rows else []
        room = PER_ROW if all(_short(s, dynamic) for s in [*row, spec]) else TEXT_PER_ROW
        if spec.name not in dynamic and row and row[0].name not in dynamic and len(row) < room:
            row.append(spec)
        else:
            rows.append([spec])
    return rows


def _short(spec: FieldSpec, dynamic: dict[str, ChoicesFn]) -> bool:
    return spec.name not in dynamic and (spec.kind in ("int", "float", "bool") or bool(spec.choices))


def refresh_button(gr: Any, target: Any, choices: ChoicesFn, elem_id: str) -> Any:
    """A small 🔄 button that refills `target`'s choices (the WebUI's create_refresh_button, without `modules`)."""
    button = gr.Button(value=REFRESH_SYMBOL, elem_id=elem_id, elem_classes=["finetune-tool"], size="sm")
    button.click(fn=lambda: gr.update(choices=choices()), inputs=[], outputs=[target], **NO_API)
    return button
