"""Tell what an artefact file is by its content (not its size): embedding, hypernetwork, checkpoint, LoRA, ..."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from finetune_core.errors import ArtifactError
from finetune_core.formats import aesthetic, checkpoint, embedding
from finetune_core.formats import hypernetwork_file as hypernetwork
from finetune_core.formats.atomic import OTHER_BINARY, file_kind, is_torch_file, load_pt, refused_pickle
from finetune_core.formats.describe import describe_object, is_embedding, is_hypernetwork
from finetune_core.formats.image_embedding import IMAGE_SUFFIXES, read_image_data
from finetune_core.formats.kinds import RUN_FILE, UNKNOWN, ArtifactInfo
from finetune_core.formats.networks import type_of

# Above this size a zip-format torch file is memory-mapped rather than read into RAM.
_MMAP_ABOVE_BYTES = 64 << 20
_WIDTH_FAMILIES = {768: "SD1", 1024: "SD2", 2048: "SDXL", 1280: "SDXL refiner"}
# CLIP joint-space widths of aesthetic embeddings: ViT-L/14 (SD1, and SDXL's CLIP-L), ViT-H/14 (SD2), bigG (SDXL).
_AESTHETIC_FAMILIES = {768: "SD1", 1024: "SD2", 1280: "SDXL"}
_LORA_DOWN_MARKERS = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight")
Shapes = dict[str, tuple[int, ...]]


def inspect_file(path: str | os.PathLike[str]) -> ArtifactInfo:
    """Identify an artefact by its content; unreadable or foreign files come back as kind "unknown" with a reason."""
    source = Path(path)
    if not source.is_file():
        raise ArtifactError(f"{source} does not exist or is not a file")
    suffix = source.suffix.lower()
    run_file = _run_file(source)
    if run_file is not None:
        return ArtifactInfo(path=source, kind=RUN_FILE, details=run_file)
    try:
        if suffix == ".safetensors":
            shapes, metadata = read_safetensors_header(source)
            return _from_shapes(source, shapes, metadata)
        if suffix in IMAGE_SUFFIXES:
            return _from_image(source)
        if not is_torch_file(source) and file_kind(source) != OTHER_BINARY:  # a text file, an image: said plainly
            return ArtifactInfo(path=source, kind=UNKNOWN, details=f"it is {file_kind(source)}")
        return _from_object(source, _load_torch(source))
    except ArtifactError as exc:
        return ArtifactInfo(path=source, kind=UNKNOWN, details=str(exc))


# The files of a training run's folder (`train/run_folder.py` writes them), by their place in it.
_RUN_FILES = {
    ("state", "checkpoint.pt"): "the resume state of a training run (its trainable weights, optimizer and counters); "
                                "not a model file: continue the run with --resume {run} (or the tab's Resume a run)",
    ("state", "config.json"): "the training settings of a run's resume state; the run {run} resumes with them",
    ("", "settings.json"): "what the training run {run} was started with (settings, model, output folder)",
    ("", "request.json"): "the request the training run {run} was started with; --resume rebuilds the run from it",
    ("", "loss.csv"): "the loss log of the training run {run} (step, epoch, epoch_step, loss, learn_rate)",
}


def _run_file(source: Path) -> str | None:
    """What a file of a training run's folder is, told by its name and place (a run folder holds request.json)."""
    for (parent, name), text in _RUN_FILES.items():
        run = source.parent.parent if parent else source.parent
        if source.name == name and (not parent or source.parent.name == parent) and (run / "request.json").is_file():
            return text.format(run=run)
    return None


def _from_image(source: Path) -> ArtifactInfo:
    """An image embedding, or a picture without one said plainly (a run's preview, a WebUI image)."""
    try:
        return _from_embedding(source, embedding.embedding_from_obj(read_image_data(source), source))
    except ArtifactError as exc:
        from PIL import Image

        try:
            with Image.open(source) as image:
                parameters = getattr(image, "text", {}).get("parameters", "")
        except OSError:
            raise exc from None
    if (source.parent.name == "images" and (source.parent.parent / "request.json").is_file()) or \
            "Fine-tune:" in parameters:
        return ArtifactInfo(path=source, kind=RUN_FILE, details=(
            f"a preview image of the training run {source.parent.parent}, not an embedding (its generation "
            f"parameters are in the PNG: the WebUI's PNG Info reads them)"))
    what = "an image with generation parameters (PNG Info reads them)" if parameters else "an image"
    return ArtifactInfo(path=source, kind=UNKNOWN, details=f"it is {what}, without an embedding inside")


def tensors_of(path: str | os.PathLike[str]) -> list[tuple[str, torch.Tensor]]:
    """Every tensor in an artefact file of any kind, named by its key path (for checks such as finiteness)."""
    source = Path(path)
    suffix = source.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(source))
        elif suffix in IMAGE_SUFFIXES:
            obj = read_image_data(source)
        else:
            obj = _load_torch(source)
    except ArtifactError:
        raise
    except Exception as exc:  # safetensors raises its own error type for damaged files
        raise ArtifactError(f"{source} cannot be read ({exc})") from exc
    return list(_walk(obj, ""))


def _walk(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix or "tensor", obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _walk(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _walk(value, f"{prefix}/{index}" if prefix else str(index))


def family_for_width(width: int | None) -> str | None:
    """Model family whose text conditioning has this width (768 is SD1, or SDXL's CLIP-L alone)."""
    return _WIDTH_FAMILIES.get(width) if width is not None else None


def read_safetensors_header(path: Path) -> tuple[Shapes, dict[str, str]]:
    """Tensor shapes and metadata from a .safetensors header, without reading the tensor data."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if length <= 0 or 8 + length > size:
            raise ArtifactError(f"{path} is not a readable .safetensors file (bad or truncated header)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{path} is not a readable .safetensors file (header is not JSON)") from exc
    metadata = header.pop("__metadata__", None) or {}
    shapes: Shapes = {}
    end = 0
    for key, entry in header.items():
        shapes[key] = tuple(int(n) for n in entry.get("shape", []))
        end = max(end, int(entry.get("data_offsets", [0, 0])[1]))
    if 8 + length + end > size:
        raise ArtifactError(f"{path} is truncated: its header promises {end} bytes of tensor data")
    return shapes, {str(k): str(v) for k, v in metadata.items()}


def _load_torch(source: Path) -> Any:
    try:
        if source.stat().st_size > _MMAP_ABOVE_BYTES and zipfile.is_zipfile(source):
            return torch.load(source, map_location="cpu", weights_only=True, mmap=True)
        return load_pt(source)
    except ArtifactError:
        raise
    except pickle.UnpicklingError as exc:
        raise refused_pickle(source, exc) from exc
    except Exception as exc:  # torch's safe unpickler raises assorted errors on garbage; all mean "unreadable"
        raise ArtifactError(f"{source} is not a readable or safe torch file: {exc}") from exc


def _from_object(source: Path, obj: Any) -> ArtifactInfo:
    if aesthetic.sniff(obj):
        width = int(obj.shape[-1])
        return ArtifactInfo(path=source, kind="aesthetic embedding", width=width, vectors=1,
                            family=_AESTHETIC_FAMILIES.get(width))
    if is_embedding(obj):
        return _from_embedding(source, embedding.embedding_from_obj(obj, source))
    if is_hypernetwork(obj):
        return _from_hypernetwork(source, hypernetwork.hypernetwork_from_obj(obj, source))
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _from_shapes(source, {str(k): tuple(v.shape) for k, v in obj.items()}, {})
    return ArtifactInfo(path=source, kind=UNKNOWN, details=describe_object(obj))


def _from_embedding(source: Path, emb: embedding.EmbeddingFile) -> ArtifactInfo:
    return ArtifactInfo(path=source, kind="embedding", name=emb.name, width=emb.width, vectors=emb.num_vectors,
                        family=family_for_width(emb.width), step=emb.step, sd_checkpoint=emb.sd_checkpoint,
                        sd_checkpoint_name=emb.sd_checkpoint_name, tensor_count=len(emb.vectors))


def _from_hypernetwork(source: Path, hn: hypernetwork.HypernetworkFile) -> ArtifactInfo:
    family = next((_WIDTH_FAMILIES[w] for w in (2048, 1024, 768) if w in hn.layers), None)
    structure = ", ".join(f"{x:g}" for x in hn.layer_structure)
    details = f"layer structure {structure}, activation {hn.activation_func or 'linear'}"
    if hn.is_layer_norm:
        details += ", layer norm"
    return ArtifactInfo(path=source, kind="hypernetwork", name=hn.name, sizes=hn.sizes, family=family,
                        step=hn.step, sd_checkpoint=hn.sd_checkpoint, sd_checkpoint_name=hn.sd_checkpoint_name,
                        details=details)


def _from_shapes(source: Path, shapes: Shapes, metadata: Mapping[str, str]) -> ArtifactInfo:
    """Classify a flat name -> shape map (a .safetensors header or a loaded state dict)."""
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        name, _, part = key.partition(".")
        groups.setdefault(name, {})[part] = shape
    if groups and all(type_of(parts) is not None for parts in groups.values()):
        return _network_info(source, groups, metadata, len(shapes))
    downs = {k: s for k, s in shapes.items() if k.endswith(_LORA_DOWN_MARKERS)}
    if downs:
        return _lora_info(source, shapes, downs, metadata)
    checkpoint_info = _checkpoint_info(source, shapes, metadata)
    if checkpoint_info is not None:
        return checkpoint_info
    if aesthetic.VECTOR_KEY in shapes:
        width = int(shapes[aesthetic.VECTOR_KEY][-1])
        made = f"made with CLIP {metadata['clip_model']}" if metadata.get("clip_model") else ""
        count = f"from {metadata['image_count']} images" if metadata.get("image_count") else ""
        return ArtifactInfo(path=source, kind="aesthetic embedding", width=width, vectors=1,
                            family=_AESTHETIC_FAMILIES.get(width), details=" ".join(p for p in (made, count) if p))
    if set(shapes) == {"clip_l", "clip_g"} or (len(shapes) == 1 and len(next(iter(shapes.values()))) in (1, 2)):
        width = sum(s[-1] for s in shapes.values())
        first = next(iter(shapes.values()))
        step = metadata.get("step")
        return ArtifactInfo(path=source, kind="embedding", name=metadata.get("name") or source.stem, width=width,
                            vectors=first[0] if len(first) == 2 else 1, family=family_for_width(width),
                            step=int(step) if step and step.isdigit() else None,
                            sd_checkpoint=metadata.get("sd_checkpoint"),
                            sd_checkpoint_name=metadata.get("sd_checkpoint_name"), tensor_count=len(shapes))
    keys = ", ".join(list(shapes)[:5]) + (", ..." if len(shapes) > 5 else "")
    return ArtifactInfo(path=source, kind=UNKNOWN, tensor_count=len(shapes),
                        details=f"{len(shapes)} tensors with names such as {keys or '(none)'}")


def _family_of(names: list[str], widths: set[int], metadata: Mapping[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    prefixes = (("sdxl_", "SDXL"), ("sd_v2", "SD2"), ("sd_v1", "SD1"))
    family = next((f for p, f in prefixes if version.startswith(p)), None)
    if family is None and any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
        return "SDXL"
    if family is None and len(widths) == 1:
        return family_for_width(next(iter(widths)))
    return family


def _network_info(source: Path, groups: Mapping[str, Mapping[str, tuple[int, ...]]], metadata: Mapping[str, str],
                  count: int) -> ArtifactInfo:
    """A network file of the registered types: its type(s), size (rank / factor / blocks), modules per part, DoRA,
    alpha, base model version and step."""
    kinds: dict[str, int] = {}
    sizes: set[str] = set()
    for parts in groups.values():
        kind = type_of(parts)
        if kind is None:
            continue
        kinds[kind.label] = kinds.get(kind.label, 0) + 1
        sizes.add(kind.describe({p: torch.empty(s, device="meta") for p, s in parts.items()}))
    names = list(groups)
    widths = {s[1] for n, parts in groups.items() for p, s in parts.items()
              if p == "lora_down.weight" and n.startswith("lora_te_") and len(s) > 1}
    parts_count = {"UNet": sum(n.startswith("lora_unet_") for n in names),
                   "text encoder": sum(n.startswith("lora_te") for n in names)}
    counts = ", ".join(f"{n} {part}" for part, n in parts_count.items() if n) or str(len(names))
    conv = sum(len(s) == 4 and s[2:] != (1, 1) for parts in groups.values() for p, s in parts.items()
               if p in ("lora_down.weight", "lokr_w2", "diff"))
    dora = sum("dora_scale" in parts for parts in groups.values())
    alpha = metadata.get("ss_network_alpha") if metadata.get("ss_network_alpha") not in (None, "None") else (
        "per module" if any("alpha" in parts for parts in groups.values()) else "none (scale 1)")
    details = (f"{' + '.join(kinds)} network, {len(names)} modules ({counts}{f', {conv} 3x3 conv' if conv else ''}), "
               f"{', '.join(sorted(sizes))}, alpha {alpha}, DoRA {'on ' + str(dora) + ' modules' if dora else 'no'}")
    version = metadata.get("ss_base_model_version")
    details += f", base {version}" if version else ""
    steps = metadata.get("ss_steps", "")
    details += f", step {steps}" if steps else ""
    return ArtifactInfo(path=source, kind="lora", family=_family_of(names, widths, metadata), tensor_count=count,
                        step=int(steps) if steps.isdigit() else None,
                        sd_checkpoint_name=metadata.get("ss_sd_model_name"),
                        sd_checkpoint=metadata.get("finetune_model_hash"), details=f"{details} (kohya naming)")


def _lora_info(source: Path, shapes: Shapes, downs: Shapes, metadata: Mapping[str, str]) -> ArtifactInfo:
    """rank, alpha, modules per part and the base model version (`ss_base_model_version`, else from the keys)."""
    kohya = any(k.startswith(("lora_unet_", "lora_te")) for k in downs)
    ranks = sorted({s[0] for s in downs.values() if s})
    family: str | None = {"sdxl_": "SDXL", "sd_v2": "SD2", "sd_v1": "SD1"}.get(
        next((p for p in ("sdxl_", "sd_v2", "sd_v1") if metadata.get("ss_base_model_version", "").startswith(p)),
             ""))
    if family is None and any(k.startswith(("lora_te1_", "lora_te2_")) for k in downs):
        family = "SDXL"
    elif family is None:
        te_widths = {s[-1] for k, s in downs.items() if k.startswith("lora_te_") and s}
        family = family_for_width(next(iter(te_widths))) if len(te_widths) == 1 else None
    parts = {"UNet": sum(k.startswith("lora_unet_") for k in downs),
             "text encoder": sum(k.startswith("lora_te") for k in downs)}
    conv = sum(len(s) == 4 and s[2:] != (1, 1) for s in downs.values())
    counts = ", ".join(f"{n} {part}" for part, n in parts.items() if n) or str(len(downs))
    alpha = metadata.get("ss_network_alpha") or ("per module" if any(k.endswith(".alpha") for k in shapes) else
                                                 "none (scale 1)")
    rank = ", ".join(map(str, ranks)) if ranks else "?"
    naming = "kohya naming" if kohya else "diffusers/PEFT naming"
    details = f"{len(downs)} modules ({counts}{f', {conv} 3x3 conv' if conv else ''}), rank {rank}, alpha {alpha}"
    version = metadata.get("ss_base_model_version")
    details += f", base {version}" if version else ""
    details += f", step {metadata['ss_steps']}" if metadata.get("ss_steps") else ""
    steps = metadata.get("ss_steps", "")
    return ArtifactInfo(path=source, kind="lora", family=family, tensor_count=len(shapes),
                        step=int(steps) if steps.isdigit() else None,
                        sd_checkpoint_name=metadata.get("ss_sd_model_name"),
                        sd_checkpoint=metadata.get("finetune_model_hash"), details=f"{details} ({naming})")


def _checkpoint_info(source: Path, shapes: Shapes, metadata: Mapping[str, str]) -> ArtifactInfo | None:
    if not checkpoint.sniff(shapes):
        return None
    try:
        family: str | None = checkpoint.detect_family(shapes).upper()
        details = ""
    except ArtifactError as exc:
        family, details = None, str(exc)
    method, step = metadata.get("finetune_method"), metadata.get("finetune_step")
    if method and not details:  # one this extension wrote (DreamBooth): how it was made
        details = f"made by {method}" + (f" in {step} steps" if step else "")
    return ArtifactInfo(path=source, kind="checkpoint", family=family, tensor_count=len(shapes), details=details,
                        sd_checkpoint=metadata.get("sd_checkpoint") if method else None,
                        sd_checkpoint_name=metadata.get("sd_checkpoint_name") if method else None)
