"""`python -m finetune_core aesthetic create | apply | bench`: Aesthetic Gradients on the command line, with the same
setting names as the tab and the REST routes (flags generated from the settings dataclasses)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from finetune_core.aesthetic import aesthetic_service
from finetune_core.aesthetic.aesthetic_service import AestheticPreviewConfig
from finetune_core.aesthetic.bench import add_arguments, run_bench
from finetune_core.aesthetic.gradients import AestheticApplyConfig, AestheticCreateConfig
from finetune_core.aesthetic.tiny_clip import is_tiny_clip
from finetune_core.cpu import set_threads
from finetune_core.jobs import service
from finetune_core.jobs.service import OutputFolders
from finetune_core.settings import (
    MODEL_HELP,
    DefaultsHelpFormatter,
    add_settings_flags,
    add_threads_flag,
    coerce_settings,
    require_model,
)

SECTIONS: dict[str, dict[str, type]] = {
    "create": {"aesthetic": AestheticCreateConfig},
    "apply": {"aesthetic": AestheticApplyConfig, "preview": AestheticPreviewConfig},
}


def add_parser(commands: Any) -> None:
    """The `aesthetic` command and its verbs."""
    parser = commands.add_parser("aesthetic", help="Aesthetic Gradients: create an embedding, generate with one, "
                                                   "bench its overhead")
    verbs = parser.add_subparsers(dest="verb", required=True)
    create = verbs.add_parser("create", help="an aesthetic embedding from a folder of images and a local CLIP",
                              description="Writes <name>.pt (the original extension's file) and <name>.safetensors "
                                          "(with the CLIP's text projection) to "
                                          "<output-dir>/models/aesthetic_embeddings.")
    create.add_argument("--name", required=True, help="the embedding's name")
    apply = verbs.add_parser("apply", help="generate with an aesthetic embedding applied",
                             description="txt2img on the model with the embedding applied to the conditioning; "
                                         "images go to <output-dir>/aesthetic/ with their infotext.")
    apply.add_argument("--model", default=None, help=f"required: {MODEL_HELP}")
    apply.add_argument("--compare", action="store_true", help="also write the same seed without the embedding")
    for verb, sub in (("create", create), ("apply", apply)):
        sub.add_argument("--output-dir", default="outputs",
                         help="laid out like the WebUI (models/aesthetic_embeddings)")
        sub.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        add_threads_flag(sub)
        taken: set[str] = set()
        for section, config_type in SECTIONS[verb].items():
            add_settings_flags(sub, section, config_type, taken)
    create.add_argument("--overwrite", action="store_true", help="replace an embedding of the same name")
    bench = verbs.add_parser("bench", help="the generation overhead: first and repeated prompt against plain "
                                           "conditioning", formatter_class=DefaultsHelpFormatter)

    add_arguments(bench)
    add_threads_flag(bench)


def run(args: argparse.Namespace) -> int:
    """Run one `aesthetic` verb; FinetuneError is left to the caller (one sentence after `error:`)."""
    set_threads(getattr(args, "threads", None))
    if args.verb == "bench":
        run_bench(args)
        return 0
    settings = _settings(args)
    if args.verb == "create":
        return _create(args, settings["aesthetic"])
    return _apply(args, settings)


def _settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS[args.verb]}
    for dest, value in vars(args).items():
        if ":" in dest and value is not None:
            section, name = dest.split(":", 1)
            out[section][name] = value
    return {section: coerce_settings(SECTIONS[args.verb][section], values, section, from_text=True)
            for section, values in out.items()}


def _create(args: argparse.Namespace, settings: dict[str, Any]) -> int:
    from tqdm import tqdm


    folders = OutputFolders.standalone(args.output_dir)
    aesthetic_service.validate_create(args.name, settings, folders, args.overwrite)  # before the CLIP loads
    bars: list[Any] = []

    def progress(done: int, total: int) -> None:
        if not bars:  # opened on the first batch: a CLIP that fails to load prints no empty bar
            bars.append(tqdm(total=total, unit="image", file=sys.stderr, dynamic_ncols=True))
        bars[0].update(done - bars[0].n)

    try:
        paths = aesthetic_service.create(args.name, settings, folders, args.overwrite, args.device, progress)
    finally:
        for bar in bars:
            bar.close()
    for path in paths:
        print(f"wrote {path}")
    clip = str(settings.get("clip_model", "")).strip()
    if is_tiny_clip(clip):
        print(f"{clip} is a built-in CLIP with random weights: this embedding is for trying the commands; it says "
              f"nothing about the images' style")
    return 0


def _apply(args: argparse.Namespace, settings: dict[str, dict[str, Any]]) -> int:
    folders = OutputFolders.standalone(args.output_dir)
    config = aesthetic_service.apply_config(settings["aesthetic"])
    preview = aesthetic_service.preview_config(settings["preview"])
    embeddings = aesthetic_service.library(lambda: [folders.aesthetic_embeddings])
    if config.aesthetic_embedding not in ("", "None"):
        embeddings.target(config.aesthetic_embedding, config.clip_model)  # a missing file is named before loading
        sidecar = embeddings.files()[config.aesthetic_embedding].sidecar
        if config.clip_model.strip() and sidecar is not None:
            print(f"note: --clip-model is not used: {sidecar} carries the text projection of the CLIP the "
                  f"embedding was made with", file=sys.stderr)
    model = service.load(require_model(args.model), args.device)
    runs = [(config, config.aesthetic_embedding)]
    if args.compare:
        runs.append((AestheticApplyConfig(), "plain"))
    for run_config, stem in runs:
        image = aesthetic_service.generate(model, embeddings, run_config, preview)[0]
        text = aesthetic_service.infotext(run_config, preview, model)
        path = aesthetic_service.write_image(image, Path(args.output_dir) / "aesthetic", f"{stem}-{preview.seed}", text)
        print(f"wrote {path}")
    return 0
