"""Stand-in for modules/ui_loadsave.py (v1.10.1): the ui-config.json that saves and restores every control's value.

What matters to an extension's tab is kept as the real one has it: the key is `<tab id>/<label>/<field>` (a
control without a label is skipped, a Tabs element keyed by its elem_id), so two controls of one label in one tab
share a key; the first value saved is applied to every control of that key at the next start; a control with
`do_not_save_to_config` is neither saved nor restored. Only the `value`/`selected` fields are tracked here (the real
one also keeps visible/minimum/maximum/step).
"""

from __future__ import annotations

import json
import os

import gradio as gr


def radio_choices(comp):
    return [x[0] if isinstance(x, tuple) else x for x in getattr(comp, "choices", [])]


class UiLoadsave:
    def __init__(self, filename):
        self.filename = filename
        self.ui_settings = {}
        self.component_mapping = {}
        if os.path.exists(filename):
            with open(filename, encoding="utf8") as file:
                self.ui_settings = json.load(file)

    def add_component(self, path, x):
        def apply_field(obj, field, condition=None):
            key = f"{path}/{field}"
            if getattr(obj, "do_not_save_to_config", False):
                return
            saved_value = self.ui_settings.get(key, None)
            if saved_value is None:
                self.ui_settings[key] = getattr(obj, field)
            elif condition and not condition(saved_value):
                pass
            else:
                if isinstance(obj, gr.Textbox) and field == "value":
                    saved_value = str(saved_value)
                elif isinstance(obj, gr.Number) and field == "value":
                    try:
                        saved_value = float(saved_value)
                    except ValueError:
                        return
                setattr(obj, field, saved_value)
            if field == "value" and key not in self.component_mapping:
                self.component_mapping[key] = obj

        if type(x) in (gr.Slider, gr.Checkbox, gr.Textbox, gr.Number):
            apply_field(x, "value")
        if type(x) == gr.Radio:
            apply_field(x, "value", lambda val: val in radio_choices(x))
        if type(x) == gr.Dropdown:
            def check_dropdown(val):
                choices = radio_choices(x)
                if getattr(x, "multiselect", False):
                    return all(value in choices for value in val)
                return val in choices
            apply_field(x, "value", check_dropdown)
        if type(x) == gr.Tabs:
            apply_field(x, "selected", lambda tab_id: True)

    def add_block(self, x, path=""):
        if hasattr(x, "children"):
            if isinstance(x, gr.Tabs) and x.elem_id is not None:
                self.add_component(f"{path}/Tabs@{x.elem_id}", x)
            for c in x.children:
                self.add_block(c, path)
        elif x.label is not None:
            self.add_component(f"{path}/{x.label}", x)
        elif isinstance(x, gr.Button) and x.value is not None:
            self.add_component(f"{path}/{x.value}", x)

    def dump_defaults(self):
        with open(self.filename, "w", encoding="utf8") as file:
            json.dump(self.ui_settings, file, indent=4, ensure_ascii=False)
