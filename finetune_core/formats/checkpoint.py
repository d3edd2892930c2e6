"""Single-file LDM checkpoints (`.safetensors` / `.ckpt`): read, write, detect the family, convert to/from diffusers.

The WebUI's layout and reading rules are those of webui-integration.md §6c; the key mapping is in `checkpoint_keys`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from finetune_core.errors import ArtifactError
from finetune_core.formats import checkpoint_keys as keys
from finetune_core.formats.atomic import atomic_write, load_pt, save_pt

logger = logging.getLogger(__name__)

PT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WRITE_SUFFIXES = (".safetensors", ".ckpt")
# SD2-Turbo stores its OpenCLIP under the SDXL-style name; the WebUI renames it to the SD2 one.
_SD2_TURBO_PREFIX = "conditioner.embedders.0.model."


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The flat tensor dict of a checkpoint file; a `.ckpt` wrapper `{"state_dict": ...}` is unwrapped.

    Pickles are loaded with `weights_only=True`, so a file that wants to import or run anything is refused.
    """
    source = Path(path)
    suffix = source.suffix.lower()
    if suffix == ".safetensors":
        obj: object = _load_safetensors(source)
    elif suffix in PT_SUFFIXES:
        obj = _load_pickle(source)
    else:
        raise ArtifactError(f"{source} is not a checkpoint: expected a .safetensors or .ckpt file")
    return _unwrap(obj, source)


def _load_safetensors(source: Path) -> dict[str, torch.Tensor]:
    """Load a `.safetensors` file into memory of its own, turning every reader failure into a sentence naming it.

    safetensors' own loader hands back views of a memory map at unaligned offsets; keeping them makes CPU kernels
    take slower paths (and differ in the last bit), and copying them keeps the whole mapped file resident beside
    the copy until the last tensor is copied (3.7 GiB of extra peak for SD1.5). So each tensor is read straight
    into its own aligned buffer: the file is in memory once, tensor by tensor.
    """
    if not source.is_file():
        raise ArtifactError(f"{source} does not exist")
    try:
        with safetensors.safe_open(str(source), framework="pt", device="cpu") as handle:  # validates the header
            keys = list(handle.keys())
        return _read_safetensors_owned(source, keys)
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(
            f"{source} is not a readable .safetensors file (truncated or another format): {exc}"
        ) from exc


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _read_safetensors_owned(source: Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors `keys` of a header-validated `.safetensors` file, each read into a fresh (aligned) buffer.

    The layout is the format's: an 8-byte little-endian header length, a JSON header of dtype, shape and byte
    offsets relative to the end of the header, then the data.
    """
    with source.open("rb") as stream:
        (header_size,) = struct.unpack("<Q", stream.read(8))
        header = json.loads(stream.read(header_size))
        base = 8 + header_size
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            info = header[key]
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {key} has the dtype {info['dtype']}, which torch does not read")
            start, end = info["data_offsets"]
            buffer = torch.empty(end - start, dtype=torch.uint8)
            stream.seek(base + start)
            if stream.readinto(buffer.numpy().data) != end - start:
                raise ValueError(f"the file ends inside tensor {key}")
            out[key] = buffer.view(dtype).reshape(info["shape"])
    return out


def _load_pickle(source: Path) -> object:
    """`load_pt`, also turning the unpickler's raw errors on a truncated legacy file into a sentence."""
    try:
        return load_pt(source)
    except (IndexError, KeyError, struct.error, UnicodeDecodeError) as exc:
        raise ArtifactError(
            f"{source} is not a readable torch file (truncated or another format): {type(exc).__name__}: {exc}"
        ) from exc


def _unwrap(obj: object, source: Path) -> dict[str, torch.Tensor]:
    """Take the `state_dict` out of a Lightning-style wrapper and keep only the tensors."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ArtifactError(f"{source} holds a {type(obj).__name__}, not a dictionary of weights")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ArtifactError(f"{source} holds no weights (no tensors found)")
    if len(tensors) != len(obj):
        logger.debug("%s: ignored %d non-tensor entries", source, len(obj) - len(tensors))
    return tensors


def read_tensors(path: str | os.PathLike[str], wanted: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint whose key `wanted` accepts, as stored (dtype and values unchanged).

    A `.safetensors` file is read lazily, so only those tensors are loaded (the VAE of a 7 GB SDXL file, not all
    of it); a `.ckpt` is unpickled whole, then filtered.
    """
    source = Path(path)
    if source.suffix.lower() != ".safetensors":
        return {k: v for k, v in read_state_dict(source).items() if wanted(k)}
    if not source.is_file():
        raise ArtifactError(f"{source} does not exist")
    try:
        with safetensors.safe_open(str(source), framework="pt", device="cpu") as handle:  # validates the header
            keys = [k for k in handle.keys() if wanted(k)]
        return _read_safetensors_owned(source, keys)
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{source} is not a readable .safetensors file (truncated or another format): "
                            f"{exc}") from exc


def tensor_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of a checkpoint, reading a `.safetensors` header only (a `.ckpt` whole)."""
    source = Path(path)
    if source.suffix.lower() != ".safetensors":
        return {k: tuple(v.shape) for k, v in read_state_dict(source).items()}
    if not source.is_file():
        raise ArtifactError(f"{source} does not exist")
    try:
        with safetensors.safe_open(str(source), framework="pt", device="cpu") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{source} is not a readable .safetensors file (truncated or another format): "
                            f"{exc}") from exc


# Old SD1 files keep CLIP's layers without `text_model.`; the WebUI renames them so on load (sd_models.py).
_OLD_SD1_TEXT = tuple(f"cond_stage_model.transformer.{part}." for part in ("embeddings", "encoder", "final_layer_norm"))


def webui_key(key: str) -> str:
    """A checkpoint key as the WebUI loads it (`transform_checkpoint_dict_key` for SD1's old text-encoder names)."""
    if key.startswith(_OLD_SD1_TEXT):
        return "cond_stage_model.transformer.text_model." + key[len("cond_stage_model.transformer."):]
    return key


def over_source(trained: Mapping[str, torch.Tensor], source: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A checkpoint of `source` with the `trained` weights in place of its own: every other entry (VAE, frozen
    text encoders, schedule buffers, EMA, layers the trainer never had) is carried over exactly as stored."""
    carried = read_tensors(source, lambda k: webui_key(k) not in trained)
    return {**carried, **trained}



def file_sha256(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Full sha256 of a file, read in chunks; its first 10 hex digits are the WebUI's shorthash."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def sniff(state_dict: Mapping[str, object]) -> bool:
    """Whether a state dict is an LDM single-file checkpoint (has the UNet under `model.diffusion_model.`)."""
    return any(isinstance(k, str) and k.startswith(keys.UNET_PREFIX) for k in state_dict)


def detect_family(names: Iterable[str]) -> str:
    """ "sd1", "sd2" or "sdxl" from the LDM keys, by the text encoder they carry, as the WebUI guesses its config."""
    names = list(names)
    if any(k.startswith(_SD2_TURBO_PREFIX) for k in names) and any(".label_emb." in k for k in names):
        raise ArtifactError("this is an SDXL refiner checkpoint; only SD1, SD2 and SDXL base models can be trained")
    prefixes = {
        "sdxl": ("conditioner.embedders.1.", keys.UNET_PREFIX + "label_emb."),
        "sd2": ("cond_stage_model.model.", _SD2_TURBO_PREFIX),
        "sd1": ("cond_stage_model.transformer.",),
    }
    for family, starts in prefixes.items():
        if any(k.startswith(starts) for k in names):
            return family
    if any(k.startswith(keys.UNET_PREFIX) for k in names):
        raise ArtifactError(
            "the checkpoint has UNet weights but no text encoder, so SD1 and SD2 cannot be told "
            "apart; use a full checkpoint that includes its text encoder"
        )
    found = ", ".join(sorted(names)[:4]) or "nothing"
    raise ArtifactError(
        f"this is not a Stable Diffusion checkpoint: it has {len(names)} weights such as {found}, "
        "but none under model.diffusion_model. (it may be a LoRA, embedding or another model)"
    )


def _normalise_ldm(state_dict: Mapping[str, torch.Tensor], family: str) -> Mapping[str, torch.Tensor]:
    """Rename SD2-Turbo's text encoder prefix to the SD2 one, as the WebUI does on load."""
    if family != "sd2" or not any(k.startswith(_SD2_TURBO_PREFIX) for k in state_dict):
        return state_dict
    return {
        ("cond_stage_model." + k[len("conditioner.embedders.0.") :] if k.startswith(_SD2_TURBO_PREFIX) else k): v
        for k, v in state_dict.items()
    }


def ldm_to_diffusers(state_dict: Mapping[str, torch.Tensor], family: str) -> dict[str, dict[str, torch.Tensor]]:
    """Split an LDM state dict into diffusers component state dicts: unet, vae, text_encoder(, text_encoder_2).

    Schedule buffers, `model_ema.*` and `position_ids` are ignored; a component absent from the file is absent here.
    """
    _check_family(family)
    state_dict = _normalise_ldm(state_dict, family)
    out = {
        "unet": keys.unet_from_ldm(keys.strip_prefix(keys.UNET_PREFIX, state_dict), family),
        "vae": keys.vae_from_ldm(keys.strip_prefix(keys.VAE_PREFIX, state_dict)),
    }
    for component, (prefix, kind) in keys.TEXT_PREFIXES[family].items():
        part = keys.strip_prefix(prefix, state_dict)
        if kind == "hf":
            out[component] = keys.hf_clip_from_ldm(part)
        else:
            drop = keys.SD2_DROPPED_LAYER if family == "sd2" else None
            out[component] = keys.openclip_from_ldm(part, drop_layer=drop, keep_projection=family == "sdxl")
    known = (keys.UNET_PREFIX, keys.VAE_PREFIX) + tuple(p for p, _ in keys.TEXT_PREFIXES[family].values())
    ignored = sum(1 for k in state_dict if not k.startswith(known))
    logger.debug("ldm_to_diffusers(%s): ignored %d keys outside the model (EMA, schedule buffers)", family, ignored)
    return {name: sd for name, sd in out.items() if sd}


def diffusers_to_ldm(components: Mapping[str, Mapping[str, torch.Tensor]], family: str) -> dict[str, torch.Tensor]:
    """Merge diffusers component state dicts into one LDM state dict (the reverse of `ldm_to_diffusers`)."""
    _check_family(family)
    text = keys.TEXT_PREFIXES[family]
    unknown = set(components) - {"unet", "vae"} - set(text)
    if unknown:
        raise ArtifactError(
            f"a {family} checkpoint has no component named {', '.join(sorted(unknown))}; "
            f"it has unet, vae, {', '.join(text)}"
        )
    out: dict[str, torch.Tensor] = {}
    if "unet" in components:
        out.update(keys.with_prefix(keys.UNET_PREFIX, keys.unet_to_ldm(components["unet"], family)))
    if "vae" in components:
        out.update(keys.with_prefix(keys.VAE_PREFIX, keys.vae_to_ldm(components["vae"])))
    for component, (prefix, kind) in text.items():
        if component not in components:
            continue
        sd = components[component]
        part = (
            {k: v for k, v in sd.items() if not k.endswith("position_ids")}
            if kind == "hf"
            else keys.openclip_to_ldm(sd)
        )
        out.update(keys.with_prefix(prefix, part))
    return out


def _check_family(family: str) -> None:
    if family not in keys.TEXT_PREFIXES:
        raise ArtifactError(f"unknown model family {family!r}; expected one of {', '.join(keys.TEXT_PREFIXES)}")


def write_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    overwrite: bool = False,
    half: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write an LDM state dict atomically: `.safetensors` flat with string metadata, or `.ckpt` as {"state_dict": ...}.

    The `.ckpt` uses the legacy serializer so a stock WebUI's restricted unpickler accepts it; its metadata, if any,
    travels as a plain {"metadata": {...}} entry beside the weights.
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in WRITE_SUFFIXES:
        raise ArtifactError(f"cannot write {target}: a checkpoint must end in .safetensors or .ckpt")
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ArtifactError(f"checkpoint metadata must be text; these entries are not: {', '.join(map(str, bad))}")
    tensors = _prepare(state_dict, half)
    size = sum(t.numel() * t.element_size() for t in tensors.values())  # the disk is checked before writing
    if suffix == ".safetensors":
        return atomic_write(
            target, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=meta or None), overwrite,
            needed_bytes=size,
        )
    payload: dict[str, object] = {"state_dict": tensors}
    if meta:
        payload["metadata"] = meta
    return save_pt(payload, target, overwrite, needed_bytes=size)


def _prepare(state_dict: Mapping[str, torch.Tensor], half: bool) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors (fp16 if `half`), cloned where two would share storage (safetensors refuses)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        tensor = value.detach().to("cpu")
        if half and tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        tensor = tensor.contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel() > 0:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out
