"""A CLIP model the user names (image tower, text projection): where its files are, its weights under transformers'
keys, and the shape of its image tower.

Two layouts are read, nothing is downloaded: a transformers `CLIPModel` folder (config.json + model.safetensors or
pytorch_model.bin, sharded or not; e.g. openai/clip-vit-large-patch14) and an open_clip model (a folder with
open_clip_config.json and open_clip_model.safetensors / open_clip_pytorch_model.bin, or one weights file). open_clip
weights are renamed to transformers' (in_proj split in q/k/v, `proj` transposed); without a config the image tower's
shape is read off the weights (activation GELU, as every open_clip training uses; OpenAI's own weights come as a
transformers folder).
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune_core.errors import ArtifactError
from finetune_core.formats.atomic import load_pt

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Attention heads of open_clip image towers whose head width is not 64 (ViT-H/14, ViT-g/14, ViT-bigG/14).
_OPENCLIP_VISION_HEADS = {1280: 16, 1408: 16, 1664: 16}
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_LAYER_RENAMES = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
                  ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj."))
_VISION_GLOBALS = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
                   "visual.class_embedding": "vision_model.embeddings.class_embedding",
                   "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
                   "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
                   "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
                   "visual.ln_post.weight": "vision_model.post_layernorm.weight",
                   "visual.ln_post.bias": "vision_model.post_layernorm.bias"}
WHAT_TO_PUT = ("a transformers CLIP folder (config.json and model.safetensors: openai/clip-vit-large-patch14 for SD1, "
               "laion/CLIP-ViT-H-14-laion2B-s32B-b79K for SD2, laion/CLIP-ViT-bigG-14-laion2B-39B-b160k for SDXL) "
               "or an open_clip model file of the same CLIP")
# Where no CLIP is named or found: the built-in ones (aesthetic/tiny_clip.py) are there to try things out.
TRY_TINY = ("; to try things out on a tiny model, name a built-in CLIP with random weights: tiny-clip (tiny-sd1, "
            "tiny-sdxl) or tiny-clip-h (tiny-sd2)")


@dataclass
class ClipFiles:
    """Where a CLIP model's weights are and how it is laid out ("transformers" or "open_clip")."""

    source: Path
    layout: str
    weights: list[Path]
    config: dict[str, Any] = field(default_factory=dict)  # config.json or open_clip_config.json, {} if none
    preprocessor: dict[str, Any] = field(default_factory=dict)  # preprocessor_config.json, {} if none

    @property
    def name(self) -> str:
        return self.source.stem if self.source.is_file() else self.source.name


def find_clip_files(path: str | Path) -> ClipFiles:
    """The CLIP model at `path` (a folder or a weights file), or a sentence saying what to put there."""
    source = Path(path).expanduser()
    if not str(path).strip():
        raise ArtifactError(f"no CLIP model is set: name {WHAT_TO_PUT}{TRY_TINY}")
    if not source.exists():
        raise ArtifactError(f"there is no CLIP model at {source}: put {WHAT_TO_PUT} there, or name where it "
                            f"is{TRY_TINY}")
    if source.is_file():
        return _single_file(source)
    if (source / "config.json").is_file() and _hf_weights(source):
        config = _read_json(source / "config.json")
        if config.get("model_type") != "clip":
            raise ArtifactError(f"{source} holds a {config.get('model_type') or 'non-CLIP'} model, not CLIP: "
                                f"name {WHAT_TO_PUT}")
        preprocessor = source / "preprocessor_config.json"
        return ClipFiles(source, "transformers", _hf_weights(source), config,
                         _read_json(preprocessor) if preprocessor.is_file() else {})
    openclip = [source / name for name in _OPENCLIP_WEIGHTS if (source / name).is_file()]
    if openclip:
        return _single_file(openclip[0])
    raise ArtifactError(f"{source} is not a CLIP model folder (no config.json with model.safetensors or "
                        f"pytorch_model.bin, no open_clip weights): put {WHAT_TO_PUT} there")


def _single_file(source: Path) -> ClipFiles:
    if source.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ArtifactError(f"{source} is not a weights file ({', '.join(WEIGHT_SUFFIXES)}): name {WHAT_TO_PUT}")
    if zipfile.is_zipfile(source) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(source).namelist()):
        raise ArtifactError(f"{source} is a TorchScript archive (the OpenAI clip package's format), which is not "
                            f"read: use the transformers folder openai/clip-vit-large-patch14 instead")
    config_path = source.parent / "open_clip_config.json"
    return ClipFiles(source, "open_clip", [source], _read_json(config_path) if config_path.is_file() else {})


def _hf_weights(folder: Path) -> list[Path]:
    for name in _HF_WEIGHTS:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            return [folder / shard for shard in shards]
    return []


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} cannot be read as JSON ({exc}); replace it with the file from the model") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is not a JSON object; replace it with the file from the model")
    return data


def read_clip_tensors(files: ClipFiles, parts: set[str]) -> dict[str, torch.Tensor]:
    """The weights of `parts` ("vision": the image tower and its projection, "text_projection") under
    transformers' CLIPModel keys (open_clip files renamed)."""
    unknown = parts - {"vision", "text_projection"}
    if unknown:
        raise ValueError(f"unknown CLIP parts {sorted(unknown)}")
    hf = files.layout == "transformers"

    def wanted(key: str) -> bool:
        if "vision" in parts and (key.startswith(("vision_model.", "visual_projection.")) if hf
                                  else key.startswith("visual.")):
            return True
        return "text_projection" in parts and key == ("text_projection.weight" if hf else "text_projection")

    out: dict[str, torch.Tensor] = {}
    for path in files.weights:
        out.update(_read_file(path, wanted))
    return out if hf else openclip_to_transformers(out)


def _read_file(path: Path, wanted: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys() if wanted(key)}
        except (SafetensorError, OSError, ValueError) as exc:
            raise ArtifactError(f"{path} is not a readable .safetensors file (truncated or another format): "
                                f"{exc}") from exc
    obj = load_pt(path)  # weights_only: a pickle that wants to run code is refused here
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path} holds a {type(obj).__name__}, not a dictionary of CLIP weights")
    return {str(k).removeprefix("module."): v for k, v in obj.items()
            if isinstance(v, torch.Tensor) and wanted(str(k).removeprefix("module."))}


def openclip_to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip image-tower and projection weights under transformers' CLIPModel keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in _VISION_GLOBALS:
            out[_VISION_GLOBALS[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()  # open_clip: x @ proj; nn.Linear: x @ W.T
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key.startswith("visual.transformer.resblocks."):
            layer, rest = key[len("visual.transformer.resblocks."):].split(".", 1)
            out.update(_layer_weights(f"vision_model.encoder.layers.{layer}.", rest, value, key))
        elif key.startswith("visual."):
            raise ArtifactError(f"the CLIP image tower has a weight this reader does not know ({key}): it is not a "
                                f"plain ViT CLIP; use {WHAT_TO_PUT}")
    return out


def _layer_weights(prefix: str, rest: str, value: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
    if rest.startswith("attn.in_proj_"):
        kind = rest[len("attn.in_proj_"):]
        q, k, v = value.chunk(3, dim=0)
        return {f"{prefix}self_attn.q_proj.{kind}": q, f"{prefix}self_attn.k_proj.{kind}": k,
                f"{prefix}self_attn.v_proj.{kind}": v}
    for old, new in _LAYER_RENAMES:
        if rest.startswith(old):
            return {prefix + new + rest[len(old):]: value}
    raise ArtifactError(f"the CLIP image tower has a layer weight this reader does not know ({key}); use "
                        f"{WHAT_TO_PUT}")


def vision_settings(files: ClipFiles, sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """CLIPVisionConfig arguments of the image tower (transformers config, open_clip config or the weights)."""
    if files.layout == "transformers":
        vision = dict(files.config.get("vision_config") or {})
        vision["projection_dim"] = files.config.get("projection_dim", vision.get("projection_dim", 512))
        return vision
    patch = sd.get("vision_model.embeddings.patch_embedding.weight")
    projection = sd.get("visual_projection.weight")
    if patch is None or projection is None:
        raise ArtifactError(f"{files.source} has no CLIP image tower (no visual.* weights): use {WHAT_TO_PUT}")
    width, positions = int(patch.shape[0]), int(sd["vision_model.embeddings.position_embedding.weight"].shape[0])
    model_cfg = files.config.get("model_cfg", files.config)
    vision_cfg = model_cfg.get("vision_cfg", {})
    heads = width // int(vision_cfg["head_width"]) if "head_width" in vision_cfg else \
        _OPENCLIP_VISION_HEADS.get(width, width // 64)
    layers = {int(k.split(".")[3]) for k in sd if k.startswith("vision_model.encoder.layers.")}
    return {"hidden_size": width, "intermediate_size": int(sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
            "num_hidden_layers": len(layers), "num_attention_heads": heads, "patch_size": int(patch.shape[-1]),
            "image_size": int(patch.shape[-1]) * math.isqrt(positions - 1), "projection_dim": int(projection.shape[0]),
            "hidden_act": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu", "layer_norm_eps": 1e-5}


@dataclass(frozen=True)
class Preprocess:
    """How images become the image tower's input, as transformers' CLIPImageProcessor does it."""

    resize: int  # shortest edge after resizing (bicubic)
    crop: int  # centre crop, square
    mean: tuple[float, float, float] = _OPENAI_MEAN
    std: tuple[float, float, float] = _OPENAI_STD


def preprocess_settings(files: ClipFiles, image_size: int) -> Preprocess:
    """The preprocessing the model was trained with (preprocessor_config.json / open_clip's preprocess_cfg)."""
    if files.layout == "open_clip":
        cfg = files.config.get("preprocess_cfg", {})
        return Preprocess(image_size, image_size, tuple(cfg.get("mean", _OPENAI_MEAN)),  # type: ignore[arg-type]
                          tuple(cfg.get("std", _OPENAI_STD)))  # type: ignore[arg-type]
    cfg = files.preprocessor
    size, crop = cfg.get("size", image_size), cfg.get("crop_size", image_size)
    size = size.get("shortest_edge", image_size) if isinstance(size, dict) else size
    crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
    return Preprocess(int(size), int(crop), tuple(cfg.get("image_mean", _OPENAI_MEAN)),  # type: ignore[arg-type]
                      tuple(cfg.get("image_std", _OPENAI_STD)))  # type: ignore[arg-type]
