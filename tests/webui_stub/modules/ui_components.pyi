"""Stand-in for modules/ui_components.py (Gradio subclasses as in the WebUI; needs gradio)."""

from __future__ import annotations

import gradio as gr


class FormComponent:
    def get_expected_parent(self):
        return FormComponent

from gradio.events import Dependency

class ToolButton(gr.Button, FormComponent):
    def __init__(self, *args, **kwargs):
        classes = kwargs.pop("elem_classes", [])
        super().__init__(*args, elem_classes=["tool", *classes], **kwargs)

    def get_block_name(self):
        return "button"
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer


class FormRow(gr.Row, FormComponent):
    def get_block_name(self):
        return "row"
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer


class FormColumn(gr.Column, FormComponent):
    def get_block_name(self):
        return "column"
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer


class FormGroup(gr.Group, FormComponent):
    def get_block_name(self):
        return "group"
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer


class FormHTML(gr.HTML, FormComponent):
    def get_block_name(self):
        return "html"
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer