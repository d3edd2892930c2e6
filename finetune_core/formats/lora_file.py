"""LoRA files as kohya's sd-scripts writes them, which the WebUI's built-in Lora extension, kohya's tools and
diffusers' `load_lora_weights` all load (lora.md §1): a flat `.safetensors` with, per module, exactly
`<name>.lora_down.weight`, `<name>.lora_up.weight` and a 0-d `<name>.alpha`, and `ss_*` string metadata.

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

DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
PARTS = (DOWN, UP, ALPHA)
SUFFIXES = (".safetensors", ".pt", ".ckpt")
# `ss_base_model_version` per family and prediction (kohya: library/model_util.py, sdxl_model_util.py); the WebUI
# shows a LoRA for SDXL only when this starts with "sdxl_", for SD2 only when `ss_v2` is "True" (lora.md §4.6).
BASE_VERSIONS = {("sd1", False): "sd_v1", ("sd2", False): "sd_v2", ("sd2", True): "sd_v2_v",
                 ("sdxl", False): "sdxl_base_v1-0", ("sdxl", True): "sdxl_base_v1-0"}
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class LoraModule:
    """One adapted layer: down (rank, in[, kh, kw]), up (out, rank[, 1, 1]) and alpha (None: old files, scale 1)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank, as the WebUI, kohya and diffusers compute it; 1 without an alpha."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class LoraFile:
    """A LoRA: modules by kohya name, and the file's string metadata."""

    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)


def sniff(keys: Mapping[str, object] | list[str]) -> bool:
    """True when every key is `<name>.lora_down.weight`, `.lora_up.weight` or `.alpha` (a plain kohya LoRA)."""
    names = list(keys)
    return bool(names) and all(key.partition(".")[2] in PARTS for key in names)


def modules_from_state(state: Mapping[str, torch.Tensor], source: str | os.PathLike[str]) -> dict[str, LoraModule]:
    """Group flat kohya keys into modules; anything else in the file is an ArtifactError that names it."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for key, tensor in state.items():
        name, _, part = key.partition(".")
        if part not in PARTS or not isinstance(tensor, torch.Tensor):
            foreign.append(key)
        else:
            parts.setdefault(name, {})[part] = tensor
    if foreign or not parts:
        shown = ", ".join(foreign[:3]) or "(no tensors)"
        raise ArtifactError(f"{source} is not a plain LoRA file: it has keys other than lora_down/lora_up/alpha "
                            f"({shown}{', ...' if len(foreign) > 3 else ''}); only kohya-style LoRA files can be used")
    modules = {}
    for name, found in parts.items():
        if DOWN not in found or UP not in found:
            lacking = "lora_up" if DOWN in found else "lora_down"
            raise ArtifactError(f"{source}: the LoRA module {name} lacks its {lacking} weight; the file is damaged")
        alpha = found.get(ALPHA)
        modules[name] = LoraModule(found[DOWN], found[UP], None if alpha is None else float(alpha.item()))
    return modules


def read_lora(path: str | os.PathLike[str]) -> LoraFile:
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
    return LoraFile(modules_from_state(state, source), metadata)


def state_dict(file: LoraFile, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The flat tensors kohya writes: every tensor, alpha included, in `dtype` (`--save_precision`), on the CPU."""
    state: dict[str, torch.Tensor] = {}
    for name, module in file.modules.items():
        state[f"{name}.{DOWN}"] = module.down.detach().to("cpu", dtype).contiguous()
        state[f"{name}.{UP}"] = module.up.detach().to("cpu", dtype).contiguous()
        alpha = float(module.rank if module.alpha is None else module.alpha)
        state[f"{name}.{ALPHA}"] = torch.tensor(alpha, dtype=dtype)
    return state


def model_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya precomputes them: sha256 of the data section of the file
    written with only the `ss_*` metadata, and the first 8 hex digits of the sha256 of 64 KiB at offset 1 MiB."""
    from safetensors.torch import save

    data = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    legacy = hashlib.sha256(BytesIO(data).getbuffer()[0x100000:0x110000]).hexdigest()[:8]
    return hashlib.sha256(data[8 + header:]).hexdigest(), legacy



def write_lora(file: LoraFile, path: str | os.PathLike[str], overwrite: bool = False,
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


def family_of(file: LoraFile) -> str | None:
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
    widths = {int(m.down.shape[1]) for n, m in file.modules.items() if n.endswith("attn2_to_k")}
    widths |= {int(m.down.shape[1]) for n, m in file.modules.items() if n.startswith("lora_te_")}
    return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(next(iter(widths))) if len(widths) == 1 else None
