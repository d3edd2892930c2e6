"""Stand-in for modules/sd_models.py: CheckpointInfo, the checkpoint list and model_data."""

from __future__ import annotations

import os

from modules import paths_internal, shared

checkpoints_list: dict = {}


class CheckpointInfo:
    def __init__(self, filename, shorthash="0123456789"):
        self.filename = filename
        root = os.path.join(paths_internal.models_path, "Stable-diffusion")
        self.name = os.path.relpath(filename, root) if filename.startswith(root) else os.path.basename(filename)
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(self.name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = shorthash[:8]
        self.sha256 = shorthash + "0" * 54
        self.shorthash = shorthash
        self.title = f"{self.name} [{self.shorthash}]"
        self.short_title = f"{self.name_for_extra} [{self.shorthash}]"
        self.metadata = {}


class ModelData:
    def __init__(self):
        self.sd_model = None

    def get_sd_model(self):
        return shared.sd_model

    def set_sd_model(self, v):
        self.sd_model = v
        shared.sd_model = v


model_data = ModelData()


def model_path():
    return os.path.join(paths_internal.models_path, "Stable-diffusion")


def list_models():
    checkpoints_list.clear()
    roots = [model_path()] + ([shared.cmd_opts.ckpt_dir] if getattr(shared.cmd_opts, "ckpt_dir", None) else [])
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for f in sorted(files):
                if f.endswith((".ckpt", ".safetensors")) and not f.endswith((".vae.ckpt", ".vae.safetensors")):
                    info = CheckpointInfo(os.path.join(dirpath, f))
                    checkpoints_list[info.title] = info


def checkpoint_tiles(use_short=False):
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


reload_calls: list = []  # test aid


def reload_model_weights(sd_model=None, info=None):
    """The real one reloads when the selected checkpoint differs from the loaded one; here it only records."""
    reload_calls.append(info)
