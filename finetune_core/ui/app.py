"""`python -m finetune_core ui`: the Fine-tune tab as its own Gradio app, with the REST routes on the same server."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune_core.cpu import set_threads
from finetune_core.errors import ConfigError
from finetune_core.hosts.job_runner import JobRunner
from finetune_core.hosts.standalone import StandaloneHost
from finetune_core.settings import add_threads_flag
from finetune_core.ui.api import mount_api
from finetune_core.ui.compat import fix_gradio4_templates, gradio_major, js_kwargs, offline_theme
from finetune_core.ui.tab import build_tab

log = logging.getLogger(__name__)
# The WebUI loads these from the extension root; the standalone app injects the same files.
REPO_ROOT = Path(__file__).resolve().parents[2]
JS_FILE = REPO_ROOT / "javascript" / "finetune.js"
CSS_FILE = REPO_ROOT / "style.css"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetune_core ui",
                                     description="Serve the Fine-tune tab on localhost.")
    parser.add_argument("--model", default="tiny-sd1",
                        help="tiny-sd1 / tiny-sd2 / tiny-sdxl, a checkpoint file or a diffusers folder (loaded lazily)")
    parser.add_argument("--output-dir", default="outputs", help="where embeddings, models and run folders go")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (127.0.0.1: this machine only)")
    add_threads_flag(parser)  # --threads 1: runs (and resumed runs) bit-identical on the CPU; see the README
    return parser


def _read(path: Path) -> str:
    if path.is_file():
        return path.read_text(encoding="utf-8")
    log.warning("%s is missing: the app runs without it (live progress needs finetune.js)", path)
    return ""


def build_app(host: StandaloneHost, runner: JobRunner | None = None, gr: Any = None) -> tuple[Any, Any, JobRunner]:
    """(gradio Blocks, FastAPI app with /finetune/v1 routes and the UI mounted at /, runner)."""
    if gr is None:
        import gradio

        gr = gradio
    from fastapi import FastAPI


    runner = runner or JobRunner(host)
    js, css = _read(JS_FILE), _read(CSS_FILE)
    extra: dict[str, Any] = {"title": "Fine-tune", "css": css}
    if gradio_major(gr) >= 4:
        fix_gradio4_templates()
        extra["head"] = f"<script>\n{js}\n</script>"
        extra["theme"] = offline_theme(gr)
    demo = build_tab(host, gr, runner=runner, blocks_kwargs=extra)
    if gradio_major(gr) < 4 and js:
        with demo:  # Gradio 3 has no head=: run the script through a load event
            demo.load(fn=None, inputs=[], outputs=[], **js_kwargs(gr, f"() => {{ {js}\n }}"))
    app = FastAPI(title="finetune_core")
    mount_api(app, host, runner)  # before the UI: the UI's mount at "/" would shadow later routes
    demo.queue()
    # Gradio 4 serves only allowed folders: previews and results live in the output folder.
    allowed = {"allowed_paths": [str(Path(host.folders().logs).parent.resolve())]} if gradio_major(gr) >= 4 else {}
    app = gr.mount_gradio_app(app, demo, path="/", **allowed)
    return demo, app, runner


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of the `ui` subcommand."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import uvicorn

    try:
        listener = listen(args.host, args.port)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        set_threads(args.threads)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host = StandaloneHost(args.output_dir, args.model)
    _, app, runner = build_app(host)
    print(f"Fine-tune app on http://{args.host}:{args.port}/ (REST under /finetune/v1/)", flush=True)
    # uvicorn stops serving on Ctrl-C and SIGTERM (a service manager, `docker stop`); the job thread would die
    # with the process, so it is asked to save and stop first.
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])
    return stop_running_job(runner)


def stop_running_job(runner: JobRunner, timeout: float = 300.0) -> int:
    """When the app stops: a running job saves its artefact and resume state, and the run folder is named."""
    if not runner.busy:
        return 0
    print("Stopping: the running job saves and stops after its current step ...", file=sys.stderr, flush=True)
    runner.interrupt()
    runner.wait(timeout)
    state = runner.state()
    if state.run_dir is not None:
        print(f"Saved; resume with --resume {state.run_dir}", file=sys.stderr)
    return 0 if state.status in ("interrupted", "finished") else 1


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket, so a port in use is said before the URL is printed (uvicorn would say it after)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} is not an address of this machine ({exc.strerror}); use 127.0.0.1 "
                          f"or 0.0.0.0") from exc
    family, _, _, _, address = infos[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart without a wait
    try:
        listener.bind(address)
        listener.listen(2048)
    except OSError as exc:
        listener.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); another program (maybe another "
                          f"copy of this app) uses that port: stop it or pass --port with a free one") from exc
    return listener
