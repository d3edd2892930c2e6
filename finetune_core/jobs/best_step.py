"""Picking a step of a finished (or paused) run (issue 23): its saved copies, the suggested one, and "use this copy".

The suggested step is the saved copy with the lowest smoothed validation loss. Smoothing: the median of three
consecutive evaluations (the one at the copy's step, the one before and the one after; at either end of the run the
mean of the two there are), so one lucky evaluation between two poor ones is not picked. The validation loss itself
has no sampling noise (fixed timesteps and noise, `finetune_core.train.validation`); what the median evens out is the
step-to-step wobble of the weights.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_core.errors import ArtifactError, ConfigError
from finetune_core.train.run_folder import RunFolder

SMOOTHING = "the median of 3 consecutive validation evaluations (the copy's, the one before and the one after)"


@dataclass(frozen=True)
class RunInfo:
    """What a run folder says about itself: its method, the artefact's name and folder, its settings."""

    path: Path
    method: str
    name: str
    final_dir: Path
    settings: dict[str, Any]
    request: dict[str, Any]


@dataclass(frozen=True)
class SavedCopy:
    step: int
    paths: tuple[Path, ...]  # the copy's files (DreamArtist: the pair)


@dataclass(frozen=True)
class Suggestion:
    step: int
    smoothed: float
    loss: float  # the validation loss evaluated at that step
    how: str = SMOOTHING


def run_info(run_dir: str | Path) -> RunInfo:
    """The run in `run_dir`; a ConfigError saying so when the folder is not a run of this tool."""
    path = Path(run_dir)
    settings_path, request_path = path / "settings.json", path / "request.json"
    if not path.is_dir():
        raise ConfigError(f"{path} does not exist; pass a run folder (it holds settings.json, loss.csv and "
                          f"artifacts/)")
    if not settings_path.is_file() or not request_path.is_file():
        raise ConfigError(f"{path} is not a run folder of this tool (no settings.json and request.json); pass the "
                          f"folder a training run wrote, e.g. outputs/runs/<method>/<date>/<name>-<time>")
    try:
        settings = json.loads(settings_path.read_text(encoding="utf-8"))
        request = json.loads(request_path.read_text(encoding="utf-8"))
        output = settings["output"]
        return RunInfo(path, str(settings["method"]), str(output["name"]), Path(output["dir"]), settings, request)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{settings_path} cannot be read ({exc}); this run folder is damaged") from exc


def saved_copies(info: RunInfo) -> list[SavedCopy]:
    """The intermediate copies in `artifacts/` (`<name>-<step>...`), oldest first."""
    folder = RunFolder(info.path).artifacts_dir
    pattern = re.compile(re.escape(info.name) + r"-(\d+)(?:[-.][^/]*)$")
    by_step: dict[int, list[Path]] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            match = pattern.match(path.name)
            if match and path.is_file():
                by_step.setdefault(int(match.group(1)), []).append(path)
    return [SavedCopy(step, tuple(by_step[step])) for step in sorted(by_step)]


def require_copies(info: RunInfo) -> list[SavedCopy]:
    copies = saved_copies(info)
    if not copies:
        raise ConfigError(f"the run {info.path} has no saved copies in artifacts/ (it saved none: set save_every, "
                          f"e.g. --save-every 100, for the next run)")
    return copies


def validation_series(info: RunInfo) -> list[tuple[int, float]]:
    """(step, validation loss) of every evaluation in loss.csv, in order."""
    return [(r.step, r.validation_loss) for r in RunFolder(info.path).loss_rows() if r.validation_loss is not None]


def smoothed(series: list[tuple[int, float]]) -> dict[int, float]:
    """Each evaluation's median with its neighbours (see the module's docstring)."""
    values = [loss for _, loss in series]
    return {step: statistics.median(values[max(0, i - 1):i + 2]) for i, (step, _) in enumerate(series)}


def suggest_step(info: RunInfo, copies: list[SavedCopy] | None = None) -> Suggestion | None:
    """The saved copy with the lowest smoothed validation loss (the earliest of equals); None when the run has no
    validation loss at any saved step."""
    series = validation_series(info)
    smooth, raw = smoothed(series), dict(series)
    candidates = [c.step for c in (copies if copies is not None else saved_copies(info)) if c.step in smooth]
    if not candidates:
        return None
    best = min(candidates, key=lambda step: (smooth[step], step))
    return Suggestion(best, smooth[best], raw[best])


def use_copy(run_dir: str | Path, step: int | None = None) -> tuple[int, list[Path], list[Path]]:
    """Copy the saved copy of `step` (None: the suggested one) over the artefact under its own name in its output
    folder; a file already there is kept as `<file>.<N>.bak`. Returns (step, files written, backups made)."""
    info = run_info(run_dir)
    copies = {c.step: c for c in require_copies(info)}
    if step is None:
        suggestion = suggest_step(info, list(copies.values()))
        if suggestion is None:
            raise ConfigError(f"the run {info.path} has no validation loss at its saved steps, so no step is "
                              f"suggested; choose one with --step ({', '.join(map(str, copies))})")
        step = suggestion.step
    if step not in copies:
        raise ConfigError(f"the run {info.path} has no copy saved at step {step}; saved steps: "
                          f"{', '.join(map(str, copies))}")
    written: list[Path] = []
    backups: list[Path] = []
    info.final_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"{info.name}-{step}"
    for source in copies[step].paths:
        target = info.final_dir / (info.name + source.name[len(prefix):])
        if target.exists():
            backups.append(_backup(target))
        sidecar = target.with_name(target.name + ".optim")  # the WebUI's optimizer state of the replaced file
        if sidecar.exists():
            backups.append(_backup(sidecar))
        try:
            shutil.copy2(source, target)
        except OSError as exc:
            raise ArtifactError(f"{source} could not be copied to {target} ({exc})") from exc
        written.append(target)
    return step, written, backups


def _backup(target: Path) -> Path:
    """Rename `target` to the first free `<target>.<N>.bak` (a name no host loads as an artefact)."""
    n = 1
    while (backup := target.with_name(f"{target.name}.{n}.bak")).exists():
        n += 1
    target.rename(backup)
    return backup
