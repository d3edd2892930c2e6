"""HTML for the tab's status panel: progress bar, loss/LR curve (inline SVG, so it renders on any Gradio), result."""

from __future__ import annotations

import html
import math
from pathlib import Path

from finetune_core.hosts.console import format_seconds
from finetune_core.hosts.host import Host
from finetune_core.hosts.job_runner import JobState, thin

_STATUS_WORDS = {"idle": "Idle", "waiting": "Starting (waits while another task uses the model)",
                 "running": "Training", "paused": "Paused", "finished": "Finished",
                 "interrupted": "Interrupted (saved)", "failed": "Failed"}


def format_speed(seconds_per_step: float | None) -> str:
    """'2.50 it/s' or '4.00 s/it', the way tqdm users read it."""
    if not seconds_per_step or not math.isfinite(seconds_per_step) or seconds_per_step <= 0:
        return "-"
    return f"{1 / seconds_per_step:.2f} it/s" if seconds_per_step < 1 else f"{seconds_per_step:.2f} s/it"


def progress_html(state: JobState, method: str) -> str:
    """The progress panel for `method`'s tab; carries data-running="1" while the job polls (finetune.js reads it)."""
    if state.status == "idle" or not state.job_id:
        return _wrap(method, False, "<div class='finetune-progress-text'>No training job yet.</div>")
    if state.method != method:
        note = f"A {html.escape(state.method)} job ('{html.escape(state.name)}') is {state.status}."
        return _wrap(method, False, f"<div class='finetune-progress-text'>{note}</div>")
    fraction = min(1.0, state.step / state.total) if state.total else 0.0
    bar = (f"<div class='finetune-bar'><div class='finetune-bar-fill' style='width:{fraction * 100:.1f}%'></div>"
           f"</div>")
    loss = f"{state.losses[-1][1]:.4f}" if state.losses else "-"
    word = _STATUS_WORDS.get(state.status, state.status)
    text = (f"<span class='finetune-state finetune-state-{state.status}'>{word}"
            f"</span> <b class='finetune-steps-done'>{state.step}/{state.total or '?'}</b> · epoch {state.epoch}"
            f" · loss {loss} · {format_speed(state.seconds_per_step)} · ETA {format_seconds(state.eta_seconds)}")
    if state.phase:
        text += f" · preparing {html.escape(state.phase)}"
    parts = [bar, f"<div class='finetune-progress-text'>{text}</div>"]
    if state.checks:  # the host's loader on the last file saved
        parts.append(f"<div class='finetune-check'>{html.escape(state.checks[-1])}</div>")
    parts += [f"<div class='finetune-message'>{html.escape(m)}</div>" for m in state.messages[-5:]]
    if state.error:
        parts.append(f"<div class='finetune-error'>{html.escape(state.error)}</div>")
    return _wrap(method, state.active, "".join(parts), state.status)


def checkpoint_line(host: Host) -> str:
    """The short line above the status panel naming the checkpoint a job started now would train on."""
    return f"<div class='finetune-checkpoint'>Trains on: <b>{html.escape(host.model_title())}</b></div>"


def _wrap(method: str, running: bool, body: str, status: str = "idle") -> str:
    return (f"<div class='finetune-status' data-method='{html.escape(method)}' data-running='{int(running)}' "
            f"data-status='{status}'>{body}</div>")


def loss_svg(losses: list[tuple[int, float]], learning_rates: list[tuple[int, float]],
             width: int = 560, height: int = 180, limit: int = 400,
             validation: list[tuple[int, float]] | None = None) -> str:
    """Loss (points + line), the validation loss (its own line, the same scale) and learning rate (dashed, own
    scale) against step, as one inline SVG."""
    if not losses:
        return "<div class='finetune-plot finetune-plot-empty'>The loss curve appears after the first step.</div>"
    points = [(s, v) for s, v in thin(losses, limit) if math.isfinite(v)]
    rates = [(s, v) for s, v in thin(learning_rates, limit) if math.isfinite(v)]
    checks = [(s, v) for s, v in thin(validation or [], limit) if math.isfinite(v)]
    pad = 36
    steps = [s for s, _ in points] + [s for s, _ in rates] + [s for s, _ in checks]
    x0, x1 = min(steps), max(steps)
    scale_x = _scaler(x0, x1, pad, width - pad)
    values = [v for _, v in points + checks] or [0.0]
    scale_y = _scaler(min(values), max(values), height - pad, pad)
    dots = "".join(f"<circle class='finetune-loss-point' cx='{scale_x(s):.1f}' cy='{scale_y(v):.1f}' r='2'/>"
                   for s, v in points)
    line = " ".join(f"{scale_x(s):.1f},{scale_y(v):.1f}" for s, v in points)
    parts = [(f"<svg class='finetune-loss-svg' viewBox='0 0 {width} {height}' width='100%' "
             f"preserveAspectRatio='xMidYMid meet' xmlns='http://www.w3.org/2000/svg' role='img'>"),
             f"<title>Loss over {len(points)} points</title>",
             f"<line class='finetune-axis' x1='{pad}' y1='{height - pad}' x2='{width - pad}' y2='{height - pad}'/>",
             f"<line class='finetune-axis' x1='{pad}' y1='{pad}' x2='{pad}' y2='{height - pad}'/>",
             f"<polyline class='finetune-loss-line' fill='none' points='{line}'/>", dots]
    if checks:
        check_line = " ".join(f"{scale_x(s):.1f},{scale_y(v):.1f}" for s, v in checks)
        parts.append(f"<polyline class='finetune-validation-line' fill='none' points='{check_line}'/>")
        parts += [f"<rect class='finetune-validation-point' x='{scale_x(s) - 2.5:.1f}' y='{scale_y(v) - 2.5:.1f}' "
                  f"width='5' height='5'/>" for s, v in checks]
        parts.append(_label(width / 2, pad - 8, f"validation {checks[-1][1]:.4g}", "middle"))
    if rates:
        lr_values = [v for _, v in rates]
        scale_lr = _scaler(min(lr_values), max(lr_values), height - pad, pad)
        lr_line = " ".join(f"{scale_x(s):.1f},{scale_lr(v):.1f}" for s, v in rates)
        parts.append(f"<polyline class='finetune-lr-line' fill='none' stroke-dasharray='4 3' points='{lr_line}'/>")
        parts.append(_label(width - pad, pad - 8, f"LR {rates[-1][1]:.2g}", "end"))
    parts += [_label(pad, pad - 8, f"loss {max(values):.4g}", "start"),
              _label(pad, height - pad + 14, f"{min(values):.4g}", "start"),
              _label(width - pad, height - pad + 14, f"step {x1}", "end"), "</svg>"]
    return f"<div class='finetune-plot'>{''.join(parts)}</div>"


def _scaler(lo: float, hi: float, out_lo: float, out_hi: float):
    span = hi - lo
    if span <= 0:
        return lambda _v: (out_lo + out_hi) / 2
    return lambda v: out_lo + (v - lo) / span * (out_hi - out_lo)


def _label(x: float, y: float, text: str, anchor: str) -> str:
    return f"<text class='finetune-plot-label' x='{x}' y='{y}' text-anchor='{anchor}'>{html.escape(text)}</text>"


def result_html(state: JobState) -> str:
    """The files the job wrote (or the error), shown under the progress panel."""
    if state.status == "failed":
        return f"<div class='finetune-result finetune-error'>{html.escape(state.error)}</div>"
    if not state.artifacts and not state.run_dir:
        return "<div class='finetune-result'></div>"
    items = "".join(f"<li><code class='finetune-artifact'>{html.escape(str(p))}</code>"
                    f"{' ' + _size(p) if Path(p).exists() else ' (missing)'}</li>" for p in state.artifacts)
    run = "" if state.run_dir is None else (f"<div>Run folder (resume from here): "
                                            f"<code>{html.escape(str(state.run_dir))}</code></div>")
    copies = [p for p in state.copies if Path(p).exists()]
    if state.artifacts:
        head = "Files written:"
    elif copies:
        head = (f"{len(copies)} cop{'y' if len(copies) == 1 else 'ies'} saved in the run folder so far, the latest "
                f"<code>{html.escape(Path(copies[-1]).name)}</code>; the final file is written when the job ends.")
    elif state.active:
        head = "No files written yet."
    else:
        head = "No files were written."
    return f"<div class='finetune-result'><div>{head}</div><ul>{items}</ul>{run}</div>"


def _size(path: Path) -> str:
    size = float(Path(path).stat().st_size)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"({size:.0f} {unit})" if unit == "B" else f"({size:.1f} {unit})"
        size /= 1024
    return ""


def gallery_items(state: JobState, method: str) -> list[tuple[Path, str]]:
    """Preview images of `method`'s job, newest first, captioned with their step."""
    if state.method != method:
        return []
    return [(p, f"step {s}") for p, s, _ in reversed(state.previews) if Path(p).exists()]
