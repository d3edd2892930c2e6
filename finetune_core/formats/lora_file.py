"""Network files (LoRA and the other types of the WebUI's Lora extension) as kohya's sd-scripts and LyCORIS write
them (lora.md §1): a flat `.safetensors` with, per module, `<name>.<part>` for the parts of its type (a plain LoRA:
exactly `lora_down.weight`, `lora_up.weight` and a 0-d `alpha`, which kohya's tools and diffusers' `load_lora_weights`
also load), an optional `dora_scale`, and `ss_*` string metadata. A module's type is the first registered type that
accepts its parts, as the WebUI decides it (`formats.networks`).

`sshs_model_hash` is the sha256 of the tensor data section (what the WebUI computes for a LoRA without it), so the
WebUI shows the same hash without reading the file again (lora.md §4.5).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import torch

from finetune_core.errors import ArtifactError
from finetune_core.formats.atomic import atomic_write, load_pt
from finetune_core.formats.networks import DORA, NETWORK_TYPES, NetworkType, type_of

ALPHA = "alpha"
SUFFIXES = (".safetensors", ".pt", ".ckpt")
# `ss_base_model_version` per family and prediction (kohya: library/model_util.py, sdxl_model_util.py); the WebUI
# shows a LoRA for SDXL only when this starts with "sdxl_", for SD2 only when `ss_v2` is "True" (lora.md §4.6).
BASE_VERSIONS = {("sd1", False): "sd_v1", ("sd2", False): "sd_v2", ("sd2", True): "sd_v2_v",
                 ("sdxl", False): "sdxl_base_v1-0", ("sdxl", True): "sdxl_base_v1-0"}
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class NetworkModule:
    """One adapted layer: its type (a key of NETWORK_TYPES) and its tensors by key part, `alpha` (0-d) and
    `dora_scale` included where present."""

    kind: str
    tensors: dict[str, torch.Tensor]

    @property
    def type(self) -> NetworkType:
        return NETWORK_TYPES[self.kind]

    @property
    def alpha(self) -> float | None:
        alpha = self.tensors.get(ALPHA)
        return None if alpha is None else float(alpha.item())

    @property
    def rank(self) -> int | None:
        return self.type.dim(self.tensors)

    @property
    def scale(self) -> float:
        """The WebUI's scale: alpha / rank where the type has both, else 1."""
        return self.type.scale(self.tensors, self.alpha)

    @property
    def dora(self) -> bool:
        return DORA in self.tensors


@dataclass
class NetworkFile:
    """A LoRA: modules by kohya name, and the file's string metadata."""

    modules: dict[str, NetworkModule]
    metadata: dict[str, str] = field(default_factory=dict)


def sniff(keys: Mapping[str, object] | list[str]) -> bool:
    """True when the keys group into modules that each match a registered network type."""
    parts: dict[str, set[str]] = {}
    for key in keys:
        name, _, part = key.partition(".")
        parts.setdefault(name, set()).add(part)
    return bool(parts) and all(type_of(found) is not None for found in parts.values())


def modules_from_state(state: Mapping[str, torch.Tensor], source: str | os.PathLike[str]) -> dict[str, NetworkModule]:
    """Group flat keys into modules and give each its type; a module no type accepts, or parts our types do not
    write (CP/Tucker `lora_mid`, bundled embeddings, ...), is an ArtifactError that names them."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name, _, part = key.partition(".")
        if not isinstance(tensor, torch.Tensor):
            raise ArtifactError(f"{source} is not a network file: {key} is not a tensor")
        parts.setdefault(name, {})[part] = tensor
    if not parts:
        raise ArtifactError(f"{source} is not a network file: it holds no tensors")
    modules = {}
    for name, found in parts.items():
        kind = type_of(found)
        if kind is None:
            raise ArtifactError(f"{source}: the module {name} has the parts {', '.join(sorted(found))}, which no "
                                f"network type the WebUI loads accepts; the file is damaged or of another kind")
        foreign = sorted(set(found) - set(kind.parts) - {ALPHA, DORA})
        if foreign:
            raise ArtifactError(f"{source}: the {kind.label} module {name} has parts this trainer does not write "
                                f"({', '.join(foreign)}); only files of the forms it writes can be continued")
        modules[name] = NetworkModule(kind.name, dict(found))
    return modules


def fits(module: NetworkModule, weight_shape: tuple[int, ...]) -> bool:
    """Whether the module's type computes a change of exactly this layer weight shape (DoRA: one magnitude per
    input column) from its tensors, as loading it onto that layer needs."""
    weight = torch.zeros(weight_shape)
    try:
        updown, _ = module.type.updown({p: t.float() for p, t in module.tensors.items()}, weight)
    except RuntimeError:
        return False
    dora = module.tensors.get(DORA)
    columns = (1, *weight_shape[1:2], *[1] * (len(weight_shape) - 2))
    return updown.shape == weight.shape and (dora is None or tuple(dora.shape) == columns)


def read_lora(path: str | os.PathLike[str]) -> NetworkFile:
    """Read a `.safetensors` (with its metadata) or a `.pt`/`.ckpt` LoRA (without)."""
    source = Path(path)
    metadata: dict[str, str] = {}
    try:
        if source.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(source), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        else:
            state = load_pt(source)
    except ArtifactError:
        raise
    except Exception as exc:  # safetensors raises its own error type for damaged files
        raise ArtifactError(f"{source} cannot be read as a LoRA file ({exc})") from exc
    if not isinstance(state, Mapping):
        raise ArtifactError(f"{source} is not a LoRA file (it holds a {type(state).__name__}, not named tensors)")
    return NetworkFile(modules_from_state(state, source), metadata)


def state_dict(file: NetworkFile, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The flat tensors kohya and LyCORIS write: every float tensor, alpha included, in `dtype` (`--save_precision`),
    on the CPU; integer flags (IA3's `on_input`) as they are."""
    state: dict[str, torch.Tensor] = {}
    for name, module in file.modules.items():
        for part, tensor in module.tensors.items():
            tensor = tensor.detach().to("cpu")
            state[f"{name}.{part}"] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
    return state


def model_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya precomputes them: sha256 of the data section of the file
    written with only the `ss_*` metadata, and the first 8 hex digits of the sha256 of 64 KiB at offset 1 MiB."""
    from safetensors.torch import save

    data = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    legacy = hashlib.sha256(BytesIO(data).getbuffer()[0x100000:0x110000]).hexdigest()[:8]
    return hashlib.sha256(data[8 + header:]).hexdigest(), legacy



def write_lora(file: NetworkFile, path: str | os.PathLike[str], overwrite: bool = False,
               dtype: torch.dtype = torch.float16) -> Path:
    """Write `file` atomically as `.safetensors` with its metadata plus `sshs_model_hash` / `sshs_legacy_hash`."""
    from safetensors.torch import save_file

    target = Path(path)
    if target.suffix.lower() != ".safetensors":
        raise ArtifactError(f"{target}: LoRA files are written as .safetensors (the only form that keeps metadata)")
    tensors = state_dict(file, dtype)
    bad = [key for key, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise ArtifactError(f"not writing {target}: {bad[0]} holds NaN or infinity (in {dtype}); lower the learning "
                            f"rate, or save in fp32 or bf16")
    metadata = {str(k): str(v) for k, v in file.metadata.items()}
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = model_hashes(tensors, metadata)
    return atomic_write(target, lambda tmp: save_file(tensors, str(tmp), metadata), overwrite)


def base_version(family: str, v_prediction: bool) -> str:
    """`ss_base_model_version` for a model family (SD2 v-prediction models get `_v`)."""
    return BASE_VERSIONS[(family, v_prediction)]


def family_of(file: NetworkFile) -> str | None:
    """The family a LoRA was made for: from `ss_base_model_version` / `ss_v2` when written, else from its keys
    (`lora_te1_`/`lora_te2_` is SDXL; a text encoder 1024 wide is SD2, 768 SD1); None when it cannot tell."""
    version = file.metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl_"):
        return "sdxl"
    if version.startswith("sd_v2") or file.metadata.get("ss_v2") == "True":
        return "sd2"
    if version.startswith("sd_v1"):
        return "sd1"
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in file.modules):
        return "sdxl"
    # the text context's width: what cross-attention keys read (768 SD1, 1024 SD2, 2048 SDXL), or the text encoder
    downs = {n: m.tensors["lora_down.weight"] for n, m in file.modules.items() if "lora_down.weight" in m.tensors}
    widths = {int(t.shape[1]) for n, t in downs.items() if n.endswith("attn2_to_k") or n.startswith("lora_te_")}
    return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(next(iter(widths))) if len(widths) == 1 else None
