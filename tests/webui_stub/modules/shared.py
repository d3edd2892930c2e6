"""Stand-in for modules/shared.py: opts, cmd_opts, state, sd_model and the refresh helpers.

Test aids: `calls` records refresh calls; `reset(root)` re-roots every folder under a temporary directory.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

from modules import paths_internal
from modules.options import OptionInfo, Options, options_section  # noqa: F401  (re-exported as in the WebUI)
from modules.shared_state import State

cmd_opts = SimpleNamespace()
opts = Options()
state = State()
progress_print_out = sys.stdout  # where the WebUI's console progress bars go
total_tqdm = None  # shared_total_tqdm.TotalTQDM, made by reset() (as shared_init.initialize makes it)
sd_model = None
demo = None
parallel_processing_allowed = True
hypernetworks: dict = {}
loaded_hypernetworks: list = []
config_filename = "config.json"
calls: list = []


def _training_options():
    return {"unload_models_when_training": OptionInfo(False), "save_optimizer_state": OptionInfo(False),
            "training_xattention_optimizations": OptionInfo(False), "CLIP_stop_at_last_layers": OptionInfo(1),
            "emphasis": OptionInfo("Original"), "comma_padding_backtrack": OptionInfo(20),
            "textual_inversion_add_hashes_to_infotext": OptionInfo(True), "sdxl_crop_top": OptionInfo(0),
            "sdxl_crop_left": OptionInfo(0), "live_previews_enable": OptionInfo(True),
            "use_old_emphasis_implementation": OptionInfo(False), "sd_hypernetwork": OptionInfo("None"),
            "persistent_cond_cache": OptionInfo(True), "lora_functional": OptionInfo(False)}


def reset(root):
    """Fresh options, state and folders under `root` (test aid)."""
    global opts, state, sd_model, hypernetworks, loaded_hypernetworks, parallel_processing_allowed, total_tqdm
    from modules import shared_total_tqdm  # it imports this module
    paths_internal.configure(root)
    models = paths_internal.models_path
    cmd_opts.__dict__.clear()
    cmd_opts.__dict__.update(
        embeddings_dir=os.path.join(root, "embeddings"), hypernetwork_dir=os.path.join(models, "hypernetworks"),
        ckpt_dir=None, textual_inversion_templates_dir=os.path.join(root, "textual_inversion_templates"),
        data_dir=str(root), models_dir=None, lowvram=False, medvram=False, medvram_sdxl=False, api_auth=None,
        api=True, nowebui=False, no_half=True, precision="full", skip_install=False,
        lora_dir=os.path.join(models, "Lora"))  # the Lora extension's preload.py default
    for folder in (cmd_opts.embeddings_dir, cmd_opts.hypernetwork_dir, cmd_opts.textual_inversion_templates_dir,
                   os.path.join(models, "Stable-diffusion")):
        os.makedirs(folder, exist_ok=True)
    opts = Options(_training_options())
    state = State()
    total_tqdm = shared_total_tqdm.TotalTQDM()
    sd_model = None
    hypernetworks = {}
    loaded_hypernetworks = []
    parallel_processing_allowed = True
    calls.clear()


def list_hypernetworks(path):
    found = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            if f.endswith(".pt") and os.path.splitext(f)[0] != "None":
                found[os.path.splitext(f)[0]] = os.path.join(dirpath, f)
    return found


def reload_hypernetworks():
    global hypernetworks
    calls.append("reload_hypernetworks")
    hypernetworks = list_hypernetworks(cmd_opts.hypernetwork_dir)


def refresh_checkpoints():
    from modules import sd_models
    calls.append("refresh_checkpoints")
    sd_models.list_models()
