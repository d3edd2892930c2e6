"""A comparison grid of a run's saved copies (issue 23): copies x prompts x seeds through the host's sampler.

Each copy is loaded the way "continue from" loads a file (the method's own build), and sampled as the run's previews
are (the method's inference extras: the embedding, the hypernetwork's context transform, the LoRA adapters) through
`model.sample`, which is our sampler standalone and the WebUI's txt2img inside it; the loaded model's own weights are
never changed. One PNG: a column per step, a row per prompt and seed, labelled, with its parameters in its text.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from finetune_core.data.scan import scan_dataset
from finetune_core.data.templates import load_template, render_prompt
from finetune_core.errors import ConfigError, ModelMismatchError
from finetune_core.formats.atomic import atomic_write
from finetune_core.jobs.best_step import RunInfo, SavedCopy, require_copies, run_info, suggest_step
from finetune_core.jobs.request import build_config, form_defaults, method_spec
from finetune_core.model.interface import DiffusionModel, SampleRequest
from finetune_core.train import randomness

CAPTION_PROMPTS = 2  # prompts taken from the run's captions besides its preview prompt
LABEL_HEIGHT = 18
LABEL_WIDTH = 200


@dataclass(frozen=True)
class Cell:
    step: int
    prompt: str
    seed: int
    image: Any  # PIL.Image.Image


@dataclass(frozen=True)
class Grid:
    path: Path
    cells: list[Cell]
    steps: list[int]
    prompts: list[str]
    seeds: list[int]
    suggested: int | None
    parameters: str


def check_compare(run_dir: str | Path, prompts: list[str] | None = None,
                  seeds: list[int] | None = None) -> tuple[RunInfo, list[SavedCopy]]:
    """Everything a grid request needs but a model: a run folder with saved copies of a method that can be loaded
    beside the model, and sane prompts and seeds."""
    info = run_info(run_dir)
    copies = require_copies(info)
    _method_config(info, copies[0])
    if prompts is not None and (not prompts or any(not p.strip() for p in prompts)):
        raise ConfigError("the prompts are empty; give one or more prompts, or none for the run's own")
    if seeds is not None and (not seeds or any(not isinstance(s, int) or s < 0 for s in seeds)):
        raise ConfigError(f"the seeds must be whole numbers of 0 or more, not {seeds}")
    return info, copies


def compare(run_dir: str | Path, model: DiffusionModel, prompts: list[str] | None = None,
            seeds: list[int] | None = None, out: str | Path | None = None) -> Grid:
    """Sample every saved copy of the run for every prompt and seed and write the labelled grid PNG."""
    info, copies = check_compare(run_dir, prompts, seeds)
    started = info.settings.get("model", {})
    if started.get("family") and started["family"] != model.family:
        raise ModelMismatchError(f"the run {info.path} was trained on {started.get('name')} "
                                 f"({str(started['family']).upper()}) but the loaded model is "
                                 f"{model.family.upper()}; load a {str(started['family']).upper()} model")
    prompts = prompts or default_prompts(info)
    seeds = seeds or [default_seed(info)]
    cells = []
    for copy in copies:
        method = _load_copy(info, copy, model)
        for prompt in prompts:
            for seed in seeds:
                cells.append(Cell(copy.step, prompt, seed, _sample(info, method, model, prompt, seed)))
    suggestion = suggest_step(info, copies)
    suggested = suggestion.step if suggestion is not None else None
    steps = [c.step for c in copies]
    parameters = json.dumps({"run": str(info.path), "method": info.method, "name": info.name, "steps": steps,
                             "prompts": prompts, "seeds": seeds, "suggested_step": suggested,
                             "smoothing": suggestion.how if suggestion else None, **_sampling(info),
                             "model": model.identity.name})
    path = Path(out) if out is not None else _next_path(info.path / "images")
    _write_grid(path, cells, steps, prompts, seeds, suggested, parameters)
    return Grid(path, cells, steps, prompts, seeds, suggested, parameters)


def default_prompts(info: RunInfo) -> list[str]:
    """The run's preview prompt (else its template's first line with the first caption) and two more from its
    captions, each through the run's prompt template."""
    data = info.request.get("data_settings", {})
    preview = str(info.settings.get("config", {}).get("preview_prompt") or "")
    prompts = [preview] if preview else []
    try:
        line = load_template(data.get("template") or "style_filewords.txt")[0]
        records = scan_dataset(Path(data["data_dir"]), bool(data.get("recursive", False))).records
    except Exception:  # noqa: BLE001  (the dataset moved since: the preview prompt alone, or the name)
        records, line = [], "[name]"
    placeholder = info.name if info.method not in ("lora", "dreambooth") else ""
    for record in sorted(records, key=lambda r: str(r.path)):
        prompt = render_prompt(line, placeholder, record.caption).strip(" ,")
        if prompt and prompt not in prompts:
            prompts.append(prompt)
        if len(prompts) >= (1 if preview else 0) + CAPTION_PROMPTS:
            break
    return prompts or [info.name]


def default_seed(info: RunInfo) -> int:
    """The run's preview seed, so the grid's cells are its previews' pictures."""
    config = info.settings.get("config", {})
    seed = int(config.get("preview_seed", -1))
    return seed if seed >= 0 else randomness.stream_seed(int(info.settings.get("seed", 0)), randomness.PREVIEW,
                                                         0) & 0x7FFFFFFF


def _method_config(info: RunInfo, copy: SavedCopy) -> Any:
    spec = method_spec(info.method)
    config = build_config(spec.config_type, form_defaults(info.method)["method"],
                          info.request.get("method_settings", {}), spec.label)
    if not hasattr(config, "continue_from"):
        raise ConfigError(f"a {spec.label} copy is a whole model, not a file applied beside one; compare its copies "
                          f"by loading each as the model (the grid compares embeddings, hypernetworks, LoRA and "
                          f"DreamArtist runs)")
    return dataclasses.replace(config, continue_from=str(_main_file(info, copy)))


def _main_file(info: RunInfo, copy: SavedCopy) -> Path:
    """The copy's own file (DreamArtist's pair: the positive one, `<name>-<step>.<ext>`)."""
    prefix = f"{info.name}-{copy.step}."
    return next((p for p in copy.paths if p.name.startswith(prefix)), copy.paths[0])


def _load_copy(info: RunInfo, copy: SavedCopy, model: DiffusionModel) -> Any:
    spec = method_spec(info.method)
    return spec.build(model, info.name, _method_config(info, copy), info.final_dir, int(info.settings.get("seed", 0)))


def _sampling(info: RunInfo) -> dict[str, Any]:
    config, data = info.settings.get("config", {}), info.request.get("data_settings", {})
    return {"sampler": config.get("preview_sampler", "DPM++ 2M"), "sampling_steps": config.get("preview_steps", 20),
            "cfg_scale": config.get("preview_cfg_scale", 7.0), "negative_prompt":
            config.get("preview_negative_prompt", ""), "width": config.get("preview_width") or data.get("width", 512),
            "height": config.get("preview_height") or data.get("height", 512)}


def _sample(info: RunInfo, method: Any, model: DiffusionModel, prompt: str, seed: int) -> Any:
    """One picture of the copy, as the loop samples a preview."""
    s = _sampling(info)
    extras = method.inference_extras()
    negative = ", ".join(p for p in (s["negative_prompt"], extras.negative_prompt_suffix.strip()) if p)
    request = SampleRequest((prompt,), (negative,), steps=s["sampling_steps"], cfg_scale=s["cfg_scale"],
                            width=s["width"], height=s["height"], seed=seed, sampler=s["sampler"])
    with torch.no_grad(), randomness.seeded_global_rng(seed, model.device):
        return model.sample(request, extras.embeddings or None, extras.context_transform, extras.adapters or None)[0]


def _next_path(folder: Path) -> Path:
    n = 1
    while (folder / f"compare-{n}.png").exists():
        n += 1
    return folder / f"compare-{n}.png"


def _write_grid(path: Path, cells: list[Cell], steps: list[int], prompts: list[str], seeds: list[int],
                suggested: int | None, parameters: str) -> None:
    w, h = cells[0].image.size
    grid = Image.new("RGB", (LABEL_WIDTH + w * len(steps), LABEL_HEIGHT + h * len(prompts) * len(seeds)), "white")
    draw = ImageDraw.Draw(grid)
    for column, step in enumerate(steps):
        label = f"step {step}" + (" *" if step == suggested else "")
        draw.text((LABEL_WIDTH + column * w + 2, 3), label, fill="black")
    rows = [(p, s) for p in prompts for s in seeds]
    for row, (prompt, seed) in enumerate(rows):
        _label(draw, f"{prompt}  (seed {seed})", (2, LABEL_HEIGHT + row * h + 2), LABEL_WIDTH - 4, h)
    for cell in cells:
        column, row = steps.index(cell.step), rows.index((cell.prompt, cell.seed))
        grid.paste(cell.image.convert("RGB"), (LABEL_WIDTH + column * w, LABEL_HEIGHT + row * h))
    info = PngInfo()
    info.add_text("parameters", parameters)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG", pnginfo=info), overwrite=True)


def _label(draw: Any, text: str, at: tuple[int, int], width: int, height: int) -> None:
    """`text` wrapped to `width` pixels, as many lines as fit in `height`."""
    words, lines, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    lines.append(line)
    for i, text_line in enumerate(lines[:max(1, (height - 4) // 12)]):
        draw.text((at[0], at[1] + i * 12), text_line, fill="black")
