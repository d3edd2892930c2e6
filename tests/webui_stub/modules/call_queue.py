"""Stand-in for modules/call_queue.py: the one global GPU lock and the Gradio wrappers."""

from __future__ import annotations

import threading
from functools import wraps

from modules import progress, shared

queue_lock = threading.Lock()  # the WebUI's FIFOLock is not re-entrant either


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)
    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    @wraps(func)
    def f(*args, **kwargs):
        id_task = args[0] if args and isinstance(args[0], str) and args[0].startswith("task(") else None
        if id_task:
            progress.add_task_to_queue(id_task)
        with queue_lock:
            shared.state.begin(job=id_task or "")
            progress.start_task(id_task)
            try:
                res = func(*args, **kwargs)
                progress.record_results(id_task, res)
            finally:
                progress.finish_task(id_task)
            shared.state.end()
        return res
    return wrap_gradio_call(f, extra_outputs=extra_outputs, add_stats=True)


def wrap_gradio_call(func, extra_outputs=None, add_stats=False):
    @wraps(func)
    def f(*args, **kwargs):
        try:
            res = list(func(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - the WebUI shows any error in the UI
            res = list(extra_outputs or [None, ""]) + [f"<div class='error'>{type(e).__name__}: {e}</div>"]
        shared.state.skipped = False
        shared.state.interrupted = False
        shared.state.stopping_generation = False
        shared.state.job_count = 0
        shared.state.job = ""
        return tuple(res)
    return f
