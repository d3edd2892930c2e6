"""The WebUI host: the loaded model, the WebUI's folders, its GPU queue lock, `shared.state` progress and the
refresh calls that make new files visible without a restart. Imports the WebUI's `modules` lazily."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from finetune_core.aesthetic.webui_script import CLIP_SETTING, webui_folders
from finetune_core.hosts.console import ConsoleProgress, format_seconds
from finetune_core.hosts.job_runner import JobRunner
from finetune_core.jobs.service import OutputFolders
from finetune_core.model.webui_backend import WebUIModel, detect_family
from finetune_core.train.events import (
    ArtifactChecked,
    ArtifactSaved,
    Event,
    Failed,
    Finished,
    Phase,
    PreviewEvent,
    Started,
    StepEvent,
    Warning_,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Settings in the WebUI's Settings page, section ("finetune", "Fine-tune", category "training").
SETTINGS = {
    "finetune_log_dir": ("", "Folder for fine-tune run logs (empty: outputs/finetune in the WebUI data folder)"),
    "finetune_refresh_after_training": (True, "Reload embeddings / hypernetworks / checkpoints after training"),
    "finetune_live_preview": (True, "Show fine-tune preview images in the live preview"),
    "finetune_aesthetic_clip": ("", "CLIP model for aesthetic embeddings: a local transformers CLIP folder or "
                                    "open_clip file (creating them; applying .pt files made elsewhere)"),
}


def setting(key: str) -> Any:
    """An option's value, or its default when the option was never registered (`--nowebui` skips registration)."""
    from modules import shared

    return getattr(shared.opts, key, SETTINGS[key][0])


def settings_options(option_info: Any) -> dict[str, Any]:
    """OptionInfo objects for SETTINGS (the script puts them into an options_section)."""
    return {key: option_info(default, label) for key, (default, label) in SETTINGS.items()}


def api_auth_dependency(cmd_opts: Any) -> list[Any]:
    """FastAPI dependencies enforcing `--api-auth user:pass[,user:pass]` as the WebUI's own API does; [] if unset."""
    credentials = getattr(cmd_opts, "api_auth", None)
    if not credentials:
        return []
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic

    pairs = [item.strip().split(":", 1) for item in credentials.split(",") if ":" in item]
    allowed = {user: password for user, password in pairs}
    basic = HTTPBasic()

    # No annotation on `creds`: with postponed annotations FastAPI 0.94 (the WebUI's) cannot resolve a local name.
    def check(creds=Depends(basic)) -> bool:  # noqa: B008 - FastAPI idiom
        expected = allowed.get(creds.username)
        if expected is not None and secrets.compare_digest(creds.password, expected):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return [Depends(check)]


# Seconds Reload UI waits for open requests before cancelling them (see bound_reload_wait).
RELOAD_GRACE_SECONDS = 10.0


def bound_reload_wait(demo: Any, seconds: float = RELOAD_GRACE_SECONDS) -> bool:
    """Let Reload UI cancel requests still open after `seconds` instead of hanging; True if the limit was set.

    Why: Blocks.close() stops Gradio 3.41's queue before the server, so a queue event that joins in between (e.g.
    the page's own load events when Reload UI is pressed early) never ends, and uvicorn, with no graceful-shutdown
    timeout, waits for it forever. A limit the user configured already is left alone.
    """
    config = getattr(getattr(demo, "server", None), "config", None)
    if config is None or not hasattr(config, "timeout_graceful_shutdown"):
        return False  # no server yet, or a uvicorn without the option
    if config.timeout_graceful_shutdown is not None:
        return False
    config.timeout_graceful_shutdown = seconds
    return True


class WebUIExtension:
    """The one host and job runner the tab and the REST routes share."""

    def __init__(self) -> None:
        self.host = WebUIHost()
        self.runner = JobRunner(self.host)


_EXTENSION: WebUIExtension | None = None


def webui_extension() -> WebUIExtension:
    """The extension's host and job runner, one per WebUI process. Reload UI runs the extension's script again but
    leaves this package imported, so the runner survives it: the new tab shows how the job the reload interrupted
    ended and which run folder resumes it."""
    global _EXTENSION
    if _EXTENSION is None:
        _EXTENSION = WebUIExtension()
    _EXTENSION.host.interrupt_handler = _EXTENSION.runner.interrupt  # the unload callback cleared it
    return _EXTENSION


def keep_out_of_ui_config(blocks: Any) -> None:
    """Mark every control of the tab `do_not_save_to_config`. The WebUI's ui-config.json keys a control by tab and
    label only ("finetune/Learning rate/value"), so the same label in several method forms would share one saved
    value and the first form's default (Textual Inversion's) would be forced on the others at every start; the tab
    keeps settings in its own presets instead."""
    pending = [blocks]
    while pending:
        block = pending.pop()
        block.do_not_save_to_config = True
        pending.extend(getattr(block, "children", None) or [])


class WebUIHost:
    """The Host protocol over the running WebUI (see finetune_core.hosts.host.Host)."""

    name = "webui"

    def __init__(self) -> None:
        self._model: Any = None
        # Called when the WebUI's Interrupt button (shared.state.interrupted) is seen; the script sets it to the
        # job runner's interrupt, so the loop saves and stops after the current step.
        self.interrupt_handler: Callable[[], Any] | None = None
        self._interrupt_forwarded = False
        self._console: ConsoleProgress | None = None

    # --- model and folders ------------------------------------------------------------------------------------
    def get_model(self) -> Any:
        from modules import shared


        sd_model = shared.sd_model
        if self._model is None or self._model.sd_model is not sd_model:
            self._model = WebUIModel(sd_model)
        return self._model

    def model_family(self) -> str | None:
        from modules import shared

        return detect_family(shared.sd_model) if shared.sd_model is not None else None

    def model_title(self) -> str:
        from modules import shared

        info = getattr(shared.sd_model, "sd_checkpoint_info", None)
        return str(info.title) if info is not None else "no checkpoint loaded"

    def model_switched(self) -> bool:
        """True when the WebUI's loaded model is no longer the one the current job uses (switched while it paused)."""
        from modules import shared

        return self._model is not None and self._model.sd_model is not shared.sd_model

    def folders(self) -> OutputFolders:
        from modules import paths, shared

        opts = shared.cmd_opts
        models = Path(paths.models_path)
        logs = setting("finetune_log_dir") or os.path.join(paths.data_path, "outputs", "finetune")
        return OutputFolders(embeddings=Path(opts.embeddings_dir), hypernetworks=Path(opts.hypernetwork_dir),
                             checkpoints=Path(getattr(opts, "ckpt_dir", None) or models / "Stable-diffusion"),
                             aesthetic_embeddings=models / "aesthetic_embeddings", logs=Path(logs),
                             loras=Path(getattr(opts, "lora_dir", None) or models / "Lora"))  # Lora's preload.py

    def model_picker(self) -> None:
        return None  # the WebUI's own checkpoint dropdown picks the model

    def aesthetic_folders(self) -> list[Path]:
        return webui_folders()

    def default_aesthetic_clip(self) -> str:
        return str(setting(CLIP_SETTING) or "")

    def template_dirs(self) -> list[Path]:
        from modules import shared

        folder = getattr(shared.cmd_opts, "textual_inversion_templates_dir", None)
        return [Path(folder)] if folder else []

    # --- jobs -------------------------------------------------------------------------------------------------
    def run_exclusive(self, job: Callable[[], T], task_id: str | None = None) -> T:
        """Run `job` holding `call_queue.queue_lock`, with `shared.state` showing it as the current job (the job's
        training session has already undone whatever it did to the loaded model when it returns)."""
        from modules import call_queue, progress, shared

        if task_id:
            progress.add_task_to_queue(task_id)
        with call_queue.queue_lock:
            shared.state.begin(job=task_id or "finetune")
            self._interrupt_forwarded = False
            if task_id:
                progress.start_task(task_id)
            try:
                return job()
            finally:
                if task_id:
                    progress.finish_task(task_id)
                shared.state.end()

    def on_event(self, event: Event) -> None:
        """Mirror loop events into `shared.state` (the WebUI's progress bar and live preview)."""
        from modules import shared

        self._to_console(event)
        state = shared.state
        if isinstance(event, Started):
            state.job_count, state.job_no = event.total_steps, event.start_step
            state.textinfo = f"Fine-tune: starting at step {event.start_step} of {event.total_steps}"
        elif isinstance(event, Phase):
            state.textinfo = f"Fine-tune: preparing {event.what}, {event.done}/{event.total}"
        elif isinstance(event, StepEvent):
            state.job_count, state.job_no = event.total_steps, event.step
            state.textinfo = (f"Step {event.step}/{event.total_steps}, loss {event.loss:.5f}, "
                              f"lr {event.learning_rate:.3g}, ETA {format_seconds(event.eta_seconds)}")
        elif isinstance(event, PreviewEvent) and setting("finetune_live_preview"):
            state.assign_current_image(event.image)
        elif isinstance(event, ArtifactSaved):
            state.textinfo = f"Step {event.step}: saved {', '.join(p.name for p in event.paths)}"
        elif isinstance(event, Finished):
            state.job_no = event.step
            verb = "Interrupted" if event.interrupted else "Finished"
            state.textinfo = f"{verb} at step {event.step}: {', '.join(p.name for p in event.artifacts)}"
        elif isinstance(event, Failed):
            state.textinfo = f"Failed at step {event.step}: {event.message}"
        elif isinstance(event, ArtifactChecked):
            state.textinfo = f"Step {event.step}: {event.line}"
            logger.info("%s", event.line)
        elif isinstance(event, Warning_):
            logger.warning("%s", event.message)
        self._forward_interrupt(state)

    def _to_console(self, event: Event) -> None:
        """A progress bar in the WebUI's console, as its own training shows (unless --disable-console-progressbars),
        and the outcome in one line."""
        from modules import shared

        starts = isinstance(event, Started) or (isinstance(event, Phase) and self._console is None)  # preparing
        if starts and not getattr(shared.cmd_opts, "disable_console_progressbars", False):
            self._console = self._console or ConsoleProgress(shared.progress_print_out, desc="Fine-tune", echo=False)
        if self._console is not None:
            self._console(event)
        if isinstance(event, Failed):
            print(f"Fine-tune: failed at step {event.step}: {event.message}", file=shared.progress_print_out)
        elif isinstance(event, Finished):
            verb = "interrupted" if event.interrupted else "finished"
            files = ", ".join(str(p) for p in event.artifacts)
            print(f"Fine-tune: {verb} at step {event.step}; wrote {files}", file=shared.progress_print_out)
        if isinstance(event, (Finished, Failed)):
            self._console = None

    def _forward_interrupt(self, state: Any) -> None:
        if state.interrupted and not self._interrupt_forwarded and self.interrupt_handler is not None:
            self._interrupt_forwarded = True
            self.interrupt_handler()

    # --- outputs ----------------------------------------------------------------------------------------------
    def artifacts_written(self, kind: str, paths: list[Path]) -> None:
        """Make new files visible now: the embedding database only notices a changed top folder, so force it."""
        if not setting("finetune_refresh_after_training"):
            return
        if kind in _REFRESH:
            _REFRESH[kind]()
        logger.info("made %d new %s file(s) visible", len(paths), kind)

    def list_existing(self, kind: str) -> list[str]:
        """Names for the dropdowns."""
        if kind == "templates":
            return sorted({f for d in self.template_dirs() if d.is_dir() for f in _text_files(d)})
        return _NAMES[kind]() if kind in _NAMES else []


def _refresh_embeddings() -> None:
    from modules import sd_hijack

    sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)


def _refresh_hypernetworks() -> None:
    from modules import shared

    shared.reload_hypernetworks()


def _refresh_checkpoints() -> None:
    from modules import shared

    shared.refresh_checkpoints()


def _refresh_loras() -> None:
    networks = _lora_extension()
    if networks is not None:
        networks.list_available_networks()  # what its Refresh button and /sdapi/v1/refresh-loras do


def _embedding_names() -> list[str]:
    from modules import sd_hijack

    return sorted(sd_hijack.model_hijack.embedding_db.word_embeddings)


def _hypernetwork_names() -> list[str]:
    from modules import shared

    return sorted(shared.hypernetworks)


def _checkpoint_names() -> list[str]:
    from modules import sd_models

    return list(sd_models.checkpoint_tiles())


def _lora_names() -> list[str]:
    networks = _lora_extension()
    return sorted(networks.available_networks) if networks is not None else []


# How the WebUI is told of new files, and where its lists of names are, per artefact kind (`formats.kinds` folders).
_REFRESH: dict[str, Callable[[], None]] = {"embeddings": _refresh_embeddings, "hypernetworks": _refresh_hypernetworks,
                                           "checkpoints": _refresh_checkpoints, "loras": _refresh_loras}
_NAMES: dict[str, Callable[[], list[str]]] = {"embeddings": _embedding_names, "hypernetworks": _hypernetwork_names,
                                              "checkpoints": _checkpoint_names, "loras": _lora_names}


def _text_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*.txt")]


def _lora_extension() -> Any:
    """The built-in Lora extension's `networks` module (imported under that top-level name), when it is loaded."""
    import sys

    return sys.modules.get("networks") if hasattr(sys.modules.get("networks"), "list_available_networks") else None

