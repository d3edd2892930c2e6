"""The tab's "Pick a step" section (issue 23): the comparison grid of a run's saved copies, the suggested step, and
"use this copy". The handlers are plain functions (testable without Gradio); `build` lays them out and wires them."""

from __future__ import annotations

from typing import Any

from finetune_core.errors import ConfigError
from finetune_core.hosts.job_runner import JobRunner
from finetune_core.jobs import best_step
from finetune_core.ui.actions import guarded, message_html
from finetune_core.ui.compat import NO_API


class PickStep:
    """The section's actions for one method's tab; an empty run folder means this tab's last run."""

    def __init__(self, runner: JobRunner, method: str) -> None:
        self.runner, self.method = runner, method

    def run_dir(self, typed: str) -> str:
        if (typed or "").strip():
            return typed.strip()
        state = self.runner.state()
        if state.method == self.method and state.run_dir is not None:
            return str(state.run_dir)
        raise ConfigError("no run folder: type the folder of a run (outputs/runs/<method>/<date>/<name>-<time>), or "
                          "train one in this tab first")

    def compare(self, typed_run: str, prompts_text: str, seeds_text: str) -> tuple[str, str]:
        """(grid PNG path, message naming the suggested step)."""
        prompts = [p.strip() for p in (prompts_text or "").splitlines() if p.strip()] or None
        seeds = _seeds(seeds_text)
        grid = self.runner.compare(self.run_dir(typed_run), prompts, seeds)
        suggested = (f"Suggested step: {grid.suggested} (marked *; {best_step.SMOOTHING})." if grid.suggested
                     is not None else "No step is suggested: the run has no validation loss at its saved steps "
                                      "(train with a validation loss, e.g. every 50 steps).")
        return str(grid.path), f"{suggested} Grid: {grid.path}"

    def try_prompt(self, prompt: str, seed_text: str) -> tuple[str, str]:
        """(picture path, message): the paused job's current state, at its preview's settings."""
        seeds = _seeds(seed_text)
        path = self.runner.generate_paused(prompt or "", "", seeds[0] if seeds else -1)
        return str(path), f"Made with the state of step {self.runner.state().step}: {path}"

    def use(self, typed_run: str, step: Any) -> str:
        chosen = None if step in (None, "", 0) else int(step)
        picked, written, backups = self.runner.use_copy(self.run_dir(typed_run), chosen)
        kept = f"; the previous file kept as {', '.join(str(p) for p in backups)}" if backups else ""
        return f"Step {picked} is now {', '.join(str(p) for p in written)}{kept}."


def _seeds(text: str) -> list[int] | None:
    parts = [p for p in (text or "").replace(",", " ").split() if p]
    if not parts:
        return None
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"the seeds must be whole numbers separated by commas or spaces, not {text!r}") from None


def build(gr: Any, runner: JobRunner, method: str, eid: Any) -> None:
    """The section, collapsed under the status panel: for a finished run (a paused one once it is stopped)."""
    pick = PickStep(runner, method)
    with gr.Accordion("Pick a step: compare the saved copies", open=False, elem_id=eid("pick_section")):
        run = gr.Textbox(label="Run folder", placeholder="empty: this tab's last run", elem_id=eid("pick_run"))
        with gr.Row():
            prompts = gr.Textbox(label="Prompts (one a line)", lines=3, elem_id=eid("pick_prompts"),
                                 placeholder="empty: the run's preview prompt and two from its captions")
            seeds = gr.Textbox(label="Seeds", placeholder="empty: the run's preview seed", elem_id=eid("pick_seeds"))
        grid_button = gr.Button("Compare saved copies", elem_id=eid("pick_compare"))
        image = gr.Image(label="Saved copies (columns: step, rows: prompt and seed)", type="filepath",
                         interactive=False, elem_id=eid("pick_grid"))
        with gr.Row():
            step = gr.Number(label="Step (0: the suggested one)", value=0, precision=0, elem_id=eid("pick_step"))
            use_button = gr.Button("Use this copy", elem_id=eid("pick_use"))
        message = gr.HTML("", elem_id=eid("pick_message"))
    with gr.Accordion("While paused: try a prompt with the state as it is", open=False,
                      elem_id=eid("paused_section")):
        with gr.Row():
            paused_prompt = gr.Textbox(label="Prompt (with the artefact's word)", scale=4,
                                       elem_id=eid("paused_prompt"))
            paused_seed = gr.Textbox(label="Seed", placeholder="empty: the preview seed", scale=1,
                                     elem_id=eid("paused_seed"))
        paused_button = gr.Button("Generate", elem_id=eid("paused_generate"))
        paused_image = gr.Image(label="With the paused state", type="filepath", interactive=False,
                                elem_id=eid("paused_image"))
        paused_message = gr.HTML("", elem_id=eid("paused_message"))

    def on_compare(run_text: str, prompts_text: str, seeds_text: str) -> tuple:
        path, text = pick.compare(run_text, prompts_text, seeds_text)
        return path, message_html(text)

    def on_use(run_text: str, step_value: Any) -> tuple:
        return (message_html(pick.use(run_text, step_value)),)

    def on_try(prompt_text: str, seed_text: str) -> tuple:
        path, text = pick.try_prompt(prompt_text, seed_text)
        return path, message_html(text)

    paused_button.click(fn=guarded(gr, on_try, 2, 1), inputs=[paused_prompt, paused_seed],
                        outputs=[paused_image, paused_message], **NO_API)
    grid_button.click(fn=guarded(gr, on_compare, 2, 1), inputs=[run, prompts, seeds], outputs=[image, message],
                      **NO_API)
    use_button.click(fn=guarded(gr, on_use, 1, 0), inputs=[run, step], outputs=[message], **NO_API)
