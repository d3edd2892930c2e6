"""Turn a model spec (built-in tiny name, diffusers folder or single-file checkpoint) into a `DiffusionModel`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from finetune_core.errors import ArtifactError, FinetuneError, ModelMismatchError
from finetune_core.formats.checkpoint import detect_family, read_state_dict
from finetune_core.formats.hash_cache import cached_sha256
from finetune_core.formats.inspect import read_safetensors_header
from finetune_core.model.diffusers_backend import DiffusersModel
from finetune_core.model.interface import EPSILON, SD1, SD2, SDXL, V_PREDICTION, DiffusionModel, ModelIdentity
from finetune_core.model.single_file import build_with_weights
from finetune_core.model.tiny import TINY_MODELS, tiny_spec

logger = logging.getLogger(__name__)

_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_ACCEPTED = (f"a built-in model ({', '.join(TINY_MODELS)}), a diffusers model folder (with model_index.json) "
             f"or a single-file checkpoint ({' / '.join(_SINGLE_FILE_SUFFIXES)})")


def load_model(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DiffusionModel:
    """Load the model `spec` names, with every weight frozen, on `device` in `dtype`."""
    device = resolve_device(device)
    _require_standalone_packages()
    if spec in TINY_MODELS:
        from finetune_core.model.tiny import build_tiny

        return build_tiny(spec, device=device, dtype=dtype)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "model_index.json").is_file():
        return load_diffusers_folder(path, device, dtype)
    if path.is_file() and path.suffix.lower() in _SINGLE_FILE_SUFFIXES:
        return _load_single_file(path, device, dtype)
    if path.is_dir():
        raise FinetuneError(f"The folder {path} has no model_index.json, so it is not a diffusers model; "
                            f"give {_ACCEPTED}.")
    if path.exists():
        raise FinetuneError(f"{path} is not a model file this trainer reads; give {_ACCEPTED}.")
    raise FinetuneError(f"There is no model {spec!r}: give {_ACCEPTED}.")


def family_before_loading(spec: str) -> str | None:
    """The family ("sd1", "sd2", "sdxl") of the model `spec` names where it shows without reading weights (a
    built-in name, a .safetensors header); None otherwise, and the family is checked when the model loads."""
    if spec in TINY_MODELS:
        return tiny_spec(spec).family
    path = Path(spec).expanduser()
    if not (path.is_file() and path.suffix.lower() == ".safetensors"):
        return None  # a diffusers folder or a pickled .ckpt: known once loaded
    try:
        return detect_family(read_safetensors_header(path)[0])
    except (ArtifactError, OSError):
        return None  # loading it says what is wrong with it


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device `device` names, or a sentence saying why it cannot be used here (before anything loads)."""
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise FinetuneError(f"--device {device!r} is not a device name; use cpu, cuda, cuda:N (N counts from 0) "
                            f"or mps") from exc
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a build without CUDA"
            raise FinetuneError(f"--device {device} asks for a CUDA GPU, but this torch ({build}) sees none; "
                                f"use --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU")
        count = torch.cuda.device_count()
        if chosen.index is not None and chosen.index >= count:
            raise FinetuneError(f"--device {device} names GPU {chosen.index}, but this machine has {count} "
                                f"(cuda:0 to cuda:{count - 1})")
    elif chosen.type == "mps" and not torch.backends.mps.is_available():
        raise FinetuneError(f"--device {device} asks for Apple's MPS, which this machine or torch build lacks; "
                            f"use --device cpu")
    elif chosen.type not in ("cpu", "cuda", "mps"):
        raise FinetuneError(f"--device {device} is a {chosen.type} device, which training does not support; "
                            f"use cpu, cuda or mps")
    return chosen


def _require_standalone_packages() -> None:
    """Standalone models are diffusers models: say how to get it rather than fail on an import deep inside."""
    import importlib.util

    missing = [name for name in ("diffusers", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise FinetuneError(f"Loading a model outside the WebUI needs {' and '.join(missing)}; install the "
                            f"standalone extra: pip install 'finetune-core[standalone]' (inside the WebUI the "
                            f"loaded checkpoint is used instead).")


def _load_single_file(path: Path, device: str | torch.device, dtype: torch.dtype) -> DiffusionModel:
    from finetune_core.model.single_file import load_single_file

    try:
        c = load_single_file(path)
    except ArtifactError as exc:  # not full-size: one trained from a built-in tiny model loads back with its configs
        c = _tiny_single_file(path, exc)
    return DiffusersModel(c.unet, c.vae, c.text_encoder, c.text_encoder_2, family=c.family,
                          prediction_type=c.prediction_type, identity=c.identity, device=device, dtype=dtype)


def _tiny_single_file(path: Path, failed: ArtifactError) -> Any:
    """A checkpoint with the architecture of a built-in tiny model (one we wrote from it), or the first error."""
    from finetune_core.model.single_file import load_single_file
    from finetune_core.model.tiny import tiny_configs, tiny_spec

    for name in TINY_MODELS:
        try:
            return load_single_file(path, configs=tiny_configs(tiny_spec(name)))
        except ArtifactError:
            continue
    raise failed


def load_diffusers_folder(folder: Path, device: str | torch.device, dtype: torch.dtype) -> DiffusionModel:
    """Load a diffusers pipeline folder offline; the tokenizers are always our own CLIP tokenizer.

    The components are built from their config.json and their weights read as a single file's are (each tensor
    into its own memory, the file once), so both ways of giving a model load alike.
    """
    index = _read_json(folder / "model_index.json", folder, "model_index.json")
    for part in ("unet", "vae", "text_encoder"):
        if part not in index or not (folder / part).is_dir():
            raise FinetuneError(f"The diffusers folder {folder} has no {part}/ component; this trainer needs a full "
                                "Stable Diffusion pipeline (unet, vae, text_encoder).")
    parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if (folder / "text_encoder_2").is_dir() else [])
    modules: dict[str, Any] = {part: _component(folder, part).to(device="cpu", dtype=dtype).eval() for part in parts}
    text_encoder_2 = modules.get("text_encoder_2")
    family = _folder_family(folder, int(modules["text_encoder"].config.hidden_size), text_encoder_2 is not None)
    identity = ModelIdentity(folder.name, _folder_shorthash(folder), str(folder))
    logger.info("loaded diffusers folder %s as %s (%s)", folder, family, identity.shorthash)
    return DiffusersModel(modules["unet"], modules["vae"], modules["text_encoder"], text_encoder_2, family=family,
                          prediction_type=_folder_prediction_type(folder), identity=identity,
                          device=device, dtype=dtype)


# diffusers names its weights diffusion_pytorch_model.*, transformers model.* / pytorch_model.*; a variant infix
# ("model.fp16.safetensors") is another copy, which from_pretrained also skips unless asked.
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def _component(folder: Path, part: str) -> torch.nn.Module:
    """One pipeline component; any failure (empty folder, bad JSON, truncated weights) names the component."""
    where = folder / part
    config = _read_json(where / "config.json", folder, f"{part}/config.json")
    files = _weight_files(where)
    if not files:
        raise FinetuneError(f"The {part} component of the diffusers folder {folder} has no weights file "
                            f"({', '.join(s + '.safetensors' for s in _WEIGHT_STEMS[:2])}); it is incomplete: "
                            f"copy or download it again")
    try:
        weights: dict[str, torch.Tensor] = {}
        for file in files:
            weights.update(read_state_dict(file))
        _fix_legacy_keys(part, config, weights)
        return build_with_weights(_component_kind(part), config, weights, f"{where}: the {part}")
    except FinetuneError as exc:
        raise FinetuneError(f"The {part} component of the diffusers folder {folder} cannot be loaded ({exc}); "
                            f"{where} is incomplete or damaged: copy or download it again") from exc


def _component_kind(part: str) -> str:
    """`build_component`'s name for a pipeline part (SDXL's second encoder carries its projection in config)."""
    return "text_encoder" if part.startswith("text_encoder") else part


def _weight_files(where: Path) -> list[Path]:
    """The component's weight file, or its shards in the order of their index (safetensors before .bin)."""
    for suffix in (".safetensors", ".bin"):
        for stem in _WEIGHT_STEMS:
            single = where / f"{stem}{suffix}"
            if single.is_file():
                return [single]
            index = where / f"{stem}{suffix}.index.json"
            if index.is_file():
                shards = _read_json(index, where, index.name).get("weight_map", {})
                return [where / name for name in dict.fromkeys(shards.values())]
    return []


def _fix_legacy_keys(part: str, config: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    """Keys older savers wrote: CLIP's persistent position_ids, and diffusers' pre-0.14 VAE attention names."""
    weights.pop("text_model.embeddings.position_ids", None)
    if part != "vae":
        return
    renames = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    for key in [k for k in weights if ".attentions." in k]:
        head, _, leaf = key.rpartition(".")
        owner, _, layer = head.rpartition(".")
        if layer in renames:
            weights[f"{owner}.{renames[layer]}.{leaf}"] = weights.pop(key)


def _read_json(path: Path, folder: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FinetuneError(f"{what} in the diffusers folder {folder} cannot be read ({exc}); the folder is "
                            f"damaged: copy or download it again") from exc
    if not isinstance(value, dict):
        raise FinetuneError(f"{what} in the diffusers folder {folder} is not a JSON object; the folder is damaged")
    return value


def _folder_family(folder: Path, text_width: int, has_second_encoder: bool) -> str:
    if has_second_encoder:
        return SDXL
    if text_width in (768, 1024):
        return SD1 if text_width == 768 else SD2
    raise ModelMismatchError(f"The text encoder in {folder / 'text_encoder'} is {text_width} wide; SD1 models use 768 "
                             "and SD2 models 1024, so this is not a Stable Diffusion 1/2/XL pipeline.")


def _folder_prediction_type(folder: Path) -> str:
    """eps or v from the pipeline's scheduler config (SD2-768 models say v_prediction there)."""
    config = folder / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        return EPSILON
    value = _read_json(config, folder, "scheduler/scheduler_config.json").get("prediction_type", EPSILON)
    return V_PREDICTION if value == V_PREDICTION else EPSILON


def _folder_shorthash(folder: Path) -> str:
    """sha256[:10] of the UNet weight file(s): the part that makes one model of a family differ from another."""
    # from_pretrained loads the files without a variant infix ("model.fp16.safetensors" is another copy).
    found = [f for ext in ("*.safetensors", "*.bin") for f in sorted((folder / "unet").glob(ext))]
    files = [f for f in found if f.name.count(".") == 1]
    files = files[:1] if len(files) > 1 and not any("-of-" in f.name for f in files) else files
    if not files:
        raise FinetuneError(f"The diffusers folder {folder} has no UNet weights in unet/; it may be incomplete.")
    if len(files) == 1:
        return cached_sha256(files[0])[:10]
    import hashlib

    return hashlib.sha256("".join(cached_sha256(f) for f in files).encode()).hexdigest()[:10]
