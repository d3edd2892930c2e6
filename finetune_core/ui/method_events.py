"""The event handlers of a method's sub-tab and their wiring to its components."""

from __future__ import annotations

from typing import Any, Protocol

from finetune_core.ui.actions import MethodActions, Values, guarded, message_html
from finetune_core.ui.compat import NO_API, gallery_value, js_kwargs
from finetune_core.ui.panels import checkpoint_line
from finetune_core.ui.schema import FieldSpec


class MethodTab(Protocol):
    """What the wiring reads from a method's sub-tab (`finetune_core.ui.method_tab.MethodTab`, which imports this
    module to wire itself)."""

    gr: Any
    ctx: Any
    spec: Any
    c: dict[str, Any]  # named components
    fields: list[tuple[str, str, Any]]  # (section, field name, component)
    create_specs: list[FieldSpec]
    actions: MethodActions

    def collect(self, values: list[Any]) -> Values: ...


def wire(tab: MethodTab) -> None:
    """Attach every button of `tab` to its handler."""
    gr, c, actions = tab.gr, tab.c, tab.actions
    fields = [comp for _, _, comp in tab.fields]
    status_outputs = [c["progress"], c["plot"], c["gallery"], c["result"], c["checkpoint"], c["poll"]]

    def on_train(task: Any, name: str, overwrite: bool, resume_run: str, *values: Any) -> tuple:
        task_id = task if isinstance(task, str) and task.startswith("task(") else None
        actions.train(name or "", tab.collect(list(values)), overwrite, resume_run or "", task_id)
        return ("", *_status(actions, None)[:-1], None)  # the progress panel says it started; no line to go stale

    c["train"].click(fn=guarded(gr, on_train, 7, 0),
                     inputs=[c["task"], c["name"], c["overwrite"], c["resume_run"], *fields],
                     outputs=[c["status"], *status_outputs], **js_kwargs(gr, tab.ctx.train_js), **NO_API)
    c["refresh"].click(fn=guarded(gr, lambda last: _refresh(gr, actions, last), 6, 0), inputs=[c["poll"]],
                       outputs=status_outputs, **NO_API)
    for key, command in (("pause", actions.runner.pause), ("resume", actions.runner.resume),
                         ("interrupt", actions.runner.interrupt)):
        c[key].click(fn=guarded(gr, _command_handler(actions, key, command), 2, 0), inputs=[],
                     outputs=[c["status"], c["progress"]], **NO_API)

    def on_lint(*values: Any) -> tuple:
        table, arithmetic = actions.lint(tab.collect(list(values)))
        return table, arithmetic, ""

    c["lint"].click(fn=guarded(gr, on_lint, 3, 2), inputs=fields,
                    outputs=[c["lint_html"], c["arithmetic"], c["status"]], **NO_API)
    def on_estimate(size: str, *values: Any) -> tuple:
        text, plan = actions.estimate(tab.collect(list(values)), size or "")
        return message_html(text), plan

    def on_apply(plan: dict[str, dict[str, Any]]) -> tuple:
        updates = [gr.update(value=plan[section][field]) if field in (plan or {}).get(section, {}) else gr.update()
                   for section, field, _ in tab.fields]
        text = "Applied the plan: Estimate memory again to check it." if plan else "No plan to apply: Estimate first."
        return (message_html(text), *updates)

    c["estimate"].click(fn=guarded(gr, on_estimate, 2, 0), inputs=[c["fit_size"], *fields],
                        outputs=[c["memory"], c["plan"]], **NO_API)
    c["apply_plan"].click(fn=guarded(gr, on_apply, 1 + len(fields), 0), inputs=[c["plan"]],
                          outputs=[c["memory"], *fields], **NO_API)
    _wire_create(tab)
    _wire_presets(tab)


def _status(actions: Any, last: Any) -> tuple:
    view = actions.status()
    return view.progress, view.plot, gallery_value(view.gallery), view.result, checkpoint_line(actions.host), last


def _refresh(gr: Any, actions: Any, last: Any) -> tuple:
    """Redraw only what changed since this browser's last poll (`last` = [job id, version, previews])."""
    state = actions.runner.state()
    key = [state.job_id, state.version, len(state.previews)]
    if last == key:
        return gr.update(), gr.update(), gr.update(), gr.update(), checkpoint_line(actions.host), last
    view = actions.status(state)
    same_gallery = bool(last) and last[0] == key[0] and last[2] == key[2]
    gallery = gr.update() if same_gallery else gallery_value(view.gallery)
    return view.progress, view.plot, gallery, view.result, checkpoint_line(actions.host), key


def _command_handler(actions: Any, key: str, command: Any) -> Any:
    def handler() -> tuple:
        done = command()
        words = {"pause": "Pausing at the next step.", "resume": "Resumed.",
                 "interrupt": "Interrupting: the job saves and stops at the next step."}
        text = words[key] if done else "No training job is running."
        return message_html(text), actions.status().progress

    return handler


def _wire_create(tab: MethodTab) -> None:
    if "create" not in tab.c:
        return
    gr, c, actions = tab.gr, tab.c, tab.actions
    create_fields = c["create_fields"]
    names = list(create_fields)
    continue_from = [comp for section, name, comp in tab.fields if section == "method" and name == "continue_from"]

    def on_create(name: str, overwrite: bool, *values: Any) -> tuple:
        message = actions.create(name or "", dict(zip(names, values)), tab.create_specs, overwrite)
        refreshed = [gr.update(choices=[""] + tab.ctx.host.list_existing(tab.spec.output_kind))] * len(continue_from)
        return (message_html(message), *refreshed)

    c["create"].click(fn=guarded_for(tab, on_create, 1 + len(continue_from)),
                      inputs=[c["name"], c["overwrite"], *create_fields.values()],
                      outputs=[c["create_message"], *continue_from], **NO_API)


def guarded_for(tab: MethodTab, fn: Any, n_outputs: int) -> Any:
    return guarded(tab.gr, fn, n_outputs, 0)


def _wire_presets(tab: MethodTab) -> None:
    gr, c, actions = tab.gr, tab.c, tab.actions
    fields = [comp for _, _, comp in tab.fields]

    def on_save(preset: str, name: str, *values: Any) -> tuple:
        message = actions.save_preset(preset or "", name or "", tab.collect(list(values)))
        return message_html(message), gr.update(choices=actions.list_presets(), value=preset)

    def on_load(preset: str) -> tuple:
        name, values = actions.load_preset(preset or "")
        updates = [gr.update(value=values[section][field]) if field in values.get(section, {}) else gr.update()
                   for section, field, _ in tab.fields]
        return (message_html(f"Loaded preset '{preset}'."), gr.update(value=name), *updates)

    c["preset_save"].click(fn=guarded_for(tab, on_save, 2), inputs=[c["preset"], c["name"], *fields],
                           outputs=[c["preset_message"], c["preset"]], **NO_API)
    c["preset_load"].click(fn=guarded_for(tab, on_load, 2 + len(fields)), inputs=[c["preset"]],
                           outputs=[c["preset_message"], c["name"], *fields], **NO_API)
