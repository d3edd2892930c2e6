"""Aesthetic Gradients as the standalone hosts call it (CLI, the tab, REST): create an embedding from a folder of
images, generate with one applied (`aesthetic apply` and the tab's preview), list the embeddings. Requests are
checked before the CLIP or the diffusion model loads; every setting has the same name in every host. Inside the
WebUI generation itself goes through the txt2img/img2img section (`aesthetic/webui_script.py`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_core.aesthetic.clip_vision import find_clip
from finetune_core.aesthetic.gradients import (
    AestheticApplyConfig,
    AestheticCreateConfig,
    AestheticLibrary,
    Progress,
    create_embedding,
    image_files,
)
from finetune_core.errors import ConfigError
from finetune_core.formats.names import refuse_same_name, sanitize_name
from finetune_core.jobs.preflight import check_writable, storage_error
from finetune_core.jobs.request import OutputFolders, build_config
from finetune_core.model.interface import DiffusionModel, SampleRequest
from finetune_core.settings import coerce_settings, coerce_value

KIND = "aesthetic_embeddings"
MIN_SIZE, MAX_SIZE = 64, 2048  # the WebUI's txt2img width/height sliders
MAX_CFG = 30.0  # the WebUI's CFG scale slider


@dataclass(frozen=True)
class AestheticPreviewConfig:
    """The txt2img settings of `aesthetic apply` and the tab's preview (the WebUI's names and defaults)."""

    prompt: str = field(default="", metadata={"label": "Prompt", "help": "What to generate."})
    negative_prompt: str = field(default="", metadata={"label": "Negative prompt", "help": "What to avoid."})
    steps: int = field(default=20, metadata={"label": "Sampling steps", "help": "1-150.", "minimum": 1,
                                             "maximum": 150})
    cfg_scale: float = field(default=7.0, metadata={"label": "CFG scale", "help": "Classifier-free guidance scale."})
    width: int = field(default=512, metadata={"label": "Width", "help": "A multiple of 8, 64-2048."})
    height: int = field(default=512, metadata={"label": "Height", "help": "A multiple of 8, 64-2048."})
    seed: int = field(default=0, metadata={"label": "Seed", "help": "The same seed gives the same image."})
    sampler: str = field(default="DPM++ 2M", metadata={"label": "Sampler", "help": "A WebUI sampler name."})

    def validate(self) -> None:
        """Raise ConfigError listing every problem."""
        problems = []
        if not 1 <= self.steps <= 150:
            problems.append(f"sampling steps must be between 1 and 150, not {self.steps}")
        if not (MIN_SIZE <= self.width <= MAX_SIZE and MIN_SIZE <= self.height <= MAX_SIZE) or \
                self.width % 8 or self.height % 8:
            problems.append(f"width and height must be multiples of 8 from {MIN_SIZE} to {MAX_SIZE} (the WebUI's "
                            f"txt2img range), not {self.width}x{self.height}")
        if not 0.0 <= self.cfg_scale <= MAX_CFG:
            problems.append(f"the CFG scale must be between 0 and {MAX_CFG}, not {self.cfg_scale}")
        if problems:
            raise ConfigError(problems)

    def request(self) -> SampleRequest:
        return SampleRequest((self.prompt,), (self.negative_prompt,), self.steps, self.cfg_scale, self.width,
                             self.height, self.seed, self.sampler)


def validate_create(name: str, settings: Mapping[str, Any], folders: OutputFolders, overwrite: Any = False,
                    default_clip: str = "") -> tuple[str, AestheticCreateConfig, Path]:
    """(clean name, settings, output folder) of a create request, or the sentence saying what is wrong; reads
    no model. `default_clip` fills an empty CLIP model setting (the WebUI's Settings entry)."""
    clean = sanitize_name(coerce_value(name, "str", False, "name"))
    values = dict(settings)
    if default_clip and not str(values.get("clip_model", "") or "").strip():
        values["clip_model"] = default_clip
    config = build_config(AestheticCreateConfig, {}, values, "aesthetic create")
    folder = folders.for_kind(KIND)
    if not coerce_value(overwrite, "bool", False, "overwrite"):
        refuse_same_name(folder, clean, KIND)
    check_writable(folder, "aesthetic embeddings folder")
    image_files(config.data_dir)
    find_clip(config.clip_model)  # where it is and its layout; the weights are read when it is made
    return clean, config, folder


def create(name: str, settings: Mapping[str, Any], folders: OutputFolders, overwrite: Any = False,
           device: str | None = None, progress: Progress | None = None, default_clip: str = "") -> list[Path]:
    """Create `<name>.pt` and its safetensors copy in the aesthetic embeddings folder."""
    clean, config, folder = validate_create(name, settings, folders, overwrite, default_clip)
    try:
        return create_embedding(clean, config, folder, bool(overwrite), device or _device(), progress)
    except OSError as exc:
        raise storage_error(exc, None) from exc


def apply_config(settings: Mapping[str, Any], from_text: bool = False) -> AestheticApplyConfig:
    """Typed, checked apply settings (defaults: the original's)."""
    typed = coerce_settings(AestheticApplyConfig, settings, "aesthetic", from_text=from_text)
    config = AestheticApplyConfig(**typed)
    config.validate()
    return config


def preview_config(settings: Mapping[str, Any], from_text: bool = False) -> AestheticPreviewConfig:
    """Typed, checked txt2img settings of a preview."""
    config = AestheticPreviewConfig(**coerce_settings(AestheticPreviewConfig, settings, "preview",
                                                      from_text=from_text))
    config.validate()
    return config


def library(folders: Callable[[], Sequence[Path]]) -> AestheticLibrary:
    """The embeddings found in `folders` (listed afresh on every call), with a conditioning cache."""
    return AestheticLibrary(folders)


def generate(model: DiffusionModel, embeddings: AestheticLibrary, config: AestheticApplyConfig,
             preview: AestheticPreviewConfig) -> list[Any]:
    """Images from the model's own sampler with the embedding applied to every conditioning it computes."""
    if preview.sampler not in model.sampler_names():
        raise ConfigError(f"the sampler {preview.sampler!r} is not available here; choose one of "
                          f"{', '.join(model.sampler_names())}")
    hook = embeddings.hook(model, config)
    if hook is None:
        return model.sample(preview.request())
    with model.text_chunk_hook(hook):
        return model.sample(preview.request())


def infotext(config: AestheticApplyConfig, preview: AestheticPreviewConfig, model: DiffusionModel) -> str:
    """The WebUI's infotext for an image: prompt, negative prompt, then `key: value` pairs (the section's keys)."""
    params: dict[str, Any] = {"Steps": preview.steps, "Sampler": preview.sampler, "CFG scale": preview.cfg_scale,
                              "Seed": preview.seed, "Size": f"{preview.width}x{preview.height}",
                              "Model hash": model.identity.shorthash, "Model": model.identity.name}
    if config.aesthetic_embedding not in ("", "None"):
        params.update(config.infotext())
    text = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items())
    negative = f"\nNegative prompt: {preview.negative_prompt}" if preview.negative_prompt else ""
    return f"{preview.prompt}{negative}\n{text}"


def _quote(value: Any) -> Any:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",\n:") else text


def write_image(image: Any, folder: Path, stem: str, text: str) -> Path:
    """Save `image` as `<stem>.png` (or `<stem>-2.png` ...) with the infotext in its `parameters` chunk."""
    from PIL.PngImagePlugin import PngInfo

    from finetune_core.formats.atomic import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    path, n = folder / f"{stem}.png", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.png"
    info = PngInfo()
    info.add_text("parameters", text)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
