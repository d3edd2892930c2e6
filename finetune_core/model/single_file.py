"""Load a WebUI single-file checkpoint (`.safetensors` / `.ckpt`) into diffusers components, fully offline.

The family comes from the keys, the architecture from the configs shipped in `finetune_core.model.configs`, and the
prediction type from a same-named `.yaml` next to the file, as the WebUI decides it (webui-integration.md §6c).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune_core.errors import ArtifactError
from finetune_core.formats.checkpoint import detect_family, ldm_to_diffusers, read_state_dict
from finetune_core.formats.hash_cache import cached_sha256
from finetune_core.model.configs import load_config
from finetune_core.model.interface import EPSILON, SD2, SDXL, V_PREDICTION, ModelIdentity

logger = logging.getLogger(__name__)

_LDM_NAMES = {
    "unet": "UNet (model.diffusion_model.*)",
    "vae": "VAE (first_stage_model.*)",
    "text_encoder": "text encoder",
    "text_encoder_2": "second text encoder (conditioner.embedders.1.*)",
}
_PARAMETERIZATION = re.compile(r"^\s*parameterization\s*:\s*[\"']?([A-Za-z_]+)", re.MULTILINE)


@dataclass
class SingleFileComponents:
    """The diffusers modules of one checkpoint file and what the trainer must know about them."""

    family: str  # "sd1" / "sd2" / "sdxl"
    prediction_type: str  # EPSILON / V_PREDICTION
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    text_encoder_2: Any | None  # transformers CLIPTextModelWithProjection (SDXL only)
    identity: ModelIdentity


def load_single_file(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    configs: Mapping[str, dict] | None = None,
) -> SingleFileComponents:
    """Build the diffusers UNet, VAE and text encoder(s) of an LDM checkpoint file with its weights, strictly.

    `configs` (component -> config dict) replaces the shipped full-size configs; tests use it for tiny models.
    """
    source = Path(path)
    state_dict = read_state_dict(source)
    family = detect_family(state_dict)
    v_marker = "v_pred" in state_dict  # SDXL v-prediction finetunes carry this empty marker tensor
    weights = ldm_to_diffusers(state_dict, family)
    del state_dict
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == SDXL else [])
    missing = [_LDM_NAMES[n] for n in names if n not in weights]
    if missing:
        raise ArtifactError(
            f"{source} is an {family} checkpoint without {', '.join(missing)} weights; "
            "use a full checkpoint (this loader downloads nothing)"
        )
    modules = {}
    for name in names:
        config = dict(configs[name]) if configs and name in configs else load_config(family, name)
        if name == "unet":
            _fit_in_channels(config, weights["unet"], source)
        modules[name] = build_with_weights(name, config, weights.pop(name), f"{source}: the {_LDM_NAMES[name]}")
        modules[name].to(device=device, dtype=dtype).eval()
    prediction = _prediction_type(source, family, modules["unet"], v_marker)
    yaml_path = source.with_suffix(".yaml")
    identity = ModelIdentity(name=source.stem, shorthash=cached_sha256(source)[:10], source=str(source),
                             config=str(yaml_path) if yaml_path.is_file() else "")
    logger.info("loaded %s as %s (%s, %s)", source, family, prediction, identity.shorthash)
    return SingleFileComponents(
        family=family,
        prediction_type=prediction,
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        text_encoder_2=modules.get("text_encoder_2"),
        identity=identity,
    )


def _fit_in_channels(config: dict, unet_weights: Mapping[str, torch.Tensor], source: Path) -> None:
    """Follow the file's UNet input width (9 for inpainting models) rather than the shipped 4."""
    conv_in = unet_weights.get("conv_in.weight")
    if conv_in is not None and conv_in.shape[1] != config.get("in_channels"):
        logger.info("%s: UNet takes %d input channels", source, conv_in.shape[1])
        config["in_channels"] = int(conv_in.shape[1])


def build_component(name: str, config: dict) -> torch.nn.Module:
    """An empty diffusers/transformers module of one component, built from its config."""
    if name == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(config)
    if name == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_config(config)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with_projection = "CLIPTextModelWithProjection" in config.get("architectures", [])
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(CLIPTextConfig.from_dict(config))


def build_with_weights(name: str, config: dict, weights: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """The module with `weights` assigned strictly (no copy), built on the meta device so nothing is initialised.

    `what` names the weights in errors ("FILE: the UNet (model.diffusion_model.*)").
    """
    with torch.device("meta"):
        module = build_component(name, config)
    try:
        result = module.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as exc:
        raise ArtifactError(
            f"{what} weights do not fit the expected architecture "
            f"({str(exc).strip().splitlines()[-1].strip()})"
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        raise ArtifactError(
            f"{what} does not match the expected architecture: "
            f"{len(result.missing_keys)} weights missing (e.g. {', '.join(result.missing_keys[:3]) or '-'}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {', '.join(result.unexpected_keys[:3]) or '-'})"
        )
    _materialise_buffers(module, what)
    return module


def _materialise_buffers(module: torch.nn.Module, what: str) -> None:
    """Rebuild non-persistent buffers left on the meta device (CLIP's position_ids is the only expected one)."""
    for full_name, buffer in list(module.named_buffers()):
        if not buffer.is_meta:
            continue
        owner_name, _, attr = full_name.rpartition(".")
        if attr != "position_ids":
            raise ArtifactError(f"{what} has an unexpected buffer {full_name}")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner.register_buffer(attr, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)


def _prediction_type(source: Path, family: str, unet: torch.nn.Module, v_marker: bool) -> str:
    """eps or v, decided like the WebUI: the same-named .yaml, else the `v_pred` marker, else SD2's UNet probe."""
    yaml_path = source.with_suffix(".yaml")
    if yaml_path.is_file():
        decided = parameterization_from_yaml(yaml_path.read_text(encoding="utf-8", errors="replace"))
        logger.info("%s: prediction type %s from %s", source, decided, yaml_path.name)
        return decided
    if v_marker:
        logger.info("%s: prediction type v_prediction from its v_pred marker", source)
        return V_PREDICTION
    if family != SD2:
        return EPSILON
    decided = V_PREDICTION if probe_v_prediction(unet) else EPSILON
    logger.info("%s: SD2 without a .yaml; the UNet probe says %s (put a .yaml next to it to decide)", source, decided)
    return decided


def parameterization_from_yaml(text: str) -> str:
    """The prediction type an LDM/sgm yaml asks for: `parameterization: "v"` (or sgm's VScaling) means v."""
    match = _PARAMETERIZATION.search(text)
    if match:
        return V_PREDICTION if match.group(1) == "v" else EPSILON
    return V_PREDICTION if "VScaling" in text else EPSILON


@torch.no_grad()
def probe_v_prediction(unet: torch.nn.Module) -> bool:
    """Whether an SD2 UNet predicts v, by the WebUI's test (`is_using_v_parameterization_for_sd2`).

    At t=999 the noisy input is almost pure noise: an eps model returns about the input itself, a v model about
    minus the clean image, so the mean of (output - input) on a constant 0.5 input falls below -1 only for v.
    """
    param = next(unet.parameters())
    config: Any = unet.config  # a diffusers UNet's FrozenDict config; nn.Module knows nothing of it
    x = torch.full((1, config.in_channels, 8, 8), 0.5, device=param.device, dtype=param.dtype)
    context = torch.full((1, 2, config.cross_attention_dim), 0.5, device=param.device, dtype=param.dtype)
    timestep = torch.tensor([999], device=param.device)
    out = unet(x, timestep, encoder_hidden_states=context).sample
    return bool((out.float() - x[:, : out.shape[1]].float()).mean().item() < -1)
