"""Stand-in for modules/ui_common.py: create_refresh_button and the symbols."""

from __future__ import annotations

refresh_symbol = "\U0001f504"
folder_symbol = "\U0001f4c2"


def create_refresh_button(refresh_component, refresh_method, refreshed_args, elem_id):
    import gradio as gr

    from modules.ui_components import ToolButton

    refresh_components = refresh_component if isinstance(refresh_component, list) else [refresh_component]

    def refresh():
        refresh_method()
        args = refreshed_args() if callable(refreshed_args) else refreshed_args
        return [gr.update(**(args or {})) for _ in refresh_components]

    button = ToolButton(value=refresh_symbol, elem_id=elem_id)
    button.click(fn=refresh, inputs=[], outputs=refresh_components)
    return button
