"""Key mapping between diffusers components and the original LDM single-file layout (SD1, SD2, SDXL).

Table-driven: each component has a list of (diffusers prefix, LDM prefix) pairs plus a few renames inside a block;
the rules are those of methods.md §7 (the diffusers `convert_*_to_original_*` scripts, re-derived, not copied).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from finetune_core.errors import ArtifactError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# LDM prefix of each text encoder, per family: component -> (prefix, "hf" | "openclip")
TEXT_PREFIXES: dict[str, dict[str, tuple[str, str]]] = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "hf")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "openclip")},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.", "hf"),
        "text_encoder_2": ("conditioner.embedders.1.model.", "openclip"),
    },
}
# Which down / up blocks carry attention (layers_per_block is 2 in every family).
UNET_ATTENTION: dict[str, tuple[tuple[bool, ...], tuple[bool, ...]]] = {
    "sd1": ((True, True, True, False), (False, True, True, True)),
    "sd2": ((True, True, True, False), (False, True, True, True)),
    "sdxl": ((False, True, True), (True, True, False)),
}
SD2_DROPPED_LAYER = 23  # SD2 conditions on the penultimate OpenCLIP layer, so diffusers keeps layers 0..22
_RESNET_RENAMES = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)
_VAE_RESNET_RENAMES = (("conv_shortcut.", "nin_shortcut."),)
_VAE_ATTN_RENAMES = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)
_VAE_LEGACY_ATTN = (("query.", "to_q."), ("key.", "to_k."), ("value.", "to_v."), ("proj_attn.", "to_out.0."))
_OPENCLIP_LAYER_RENAMES = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)
_OPENCLIP_GLOBALS = (
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.final_layer_norm.weight", "ln_final.weight"),
    ("text_model.final_layer_norm.bias", "ln_final.bias"),
)
_HF_LAYERS = "text_model.encoder.layers."
_OC_LAYERS = "transformer.resblocks."
_QKV = ("q_proj", "k_proj", "v_proj")


def unet_rules(family: str) -> list[tuple[str, str, tuple[tuple[str, str], ...]]]:
    """(diffusers prefix, LDM prefix, inner renames) for every UNet block of `family` (methods.md §7.2, §7.5)."""
    down_attn, up_attn = UNET_ATTENTION[family]
    none: tuple[tuple[str, str], ...] = ()
    rules = [
        ("time_embedding.linear_1.", "time_embed.0.", none),
        ("time_embedding.linear_2.", "time_embed.2.", none),
        ("conv_in.", "input_blocks.0.0.", none),
        ("conv_norm_out.", "out.0.", none),
        ("conv_out.", "out.2.", none),
        ("mid_block.resnets.0.", "middle_block.0.", _RESNET_RENAMES),
        ("mid_block.attentions.0.", "middle_block.1.", none),
        ("mid_block.resnets.1.", "middle_block.2.", _RESNET_RENAMES),
    ]
    if family == "sdxl":
        rules += [
            ("add_embedding.linear_1.", "label_emb.0.0.", none),
            ("add_embedding.linear_2.", "label_emb.0.2.", none),
        ]
    last = len(down_attn) - 1
    for i, has_attn in enumerate(down_attn):
        for j in range(2):
            rules.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0.", _RESNET_RENAMES))
            if has_attn:
                rules.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1.", none))
        if i < last:
            rules.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * (i + 1)}.0.op.", none))
    for i, has_attn in enumerate(up_attn):
        for j in range(3):
            rules.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0.", _RESNET_RENAMES))
            if has_attn:
                rules.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1.", none))
        if i < last:
            # The upsampler follows the attention when the block has one (SDXL's output_blocks.2.2 fix-up).
            rules.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.{2 if has_attn else 1}.", none))
    return rules


def vae_rules() -> list[tuple[str, str, tuple[tuple[str, str], ...]]]:
    """(diffusers prefix, LDM prefix, inner renames) for every VAE block (methods.md §7.3); decoder ups are reversed."""
    none: tuple[tuple[str, str], ...] = ()
    rules = [
        (f"{part}.{name}.", f"{part}.{name}.", none)
        for part in ("encoder", "decoder")
        for name in ("conv_in", "conv_out")
    ]
    rules += [
        ("encoder.conv_norm_out.", "encoder.norm_out.", none),
        ("decoder.conv_norm_out.", "decoder.norm_out.", none),
        ("quant_conv.", "quant_conv.", none),
        ("post_quant_conv.", "post_quant_conv.", none),
    ]
    for part in ("encoder", "decoder"):
        rules.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTN_RENAMES))
        rules += [(f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.", _VAE_RESNET_RENAMES) for k in (0, 1)]
    for i in range(4):
        rules += [
            (f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET_RENAMES)
            for j in range(2)
        ]
        rules += [
            (f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{3 - i}.block.{j}.", _VAE_RESNET_RENAMES)
            for j in range(3)
        ]
        if i < 3:
            rules.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", none))
            rules.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{3 - i}.upsample.", none))
    return rules


def map_key(key: str, rules: list[tuple[str, str, tuple[tuple[str, str], ...]]], reverse: bool = False) -> str | None:
    """Rename one key by the first rule whose prefix it starts with (diffusers->LDM, or LDM->diffusers if reverse)."""
    for dif, ldm, inner in rules:
        src, dst = (ldm, dif) if reverse else (dif, ldm)
        if key.startswith(src):
            rest = key[len(src) :]
            for a, b in inner:
                a, b = (b, a) if reverse else (a, b)
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
                    break
            return dst + rest
    return None


def _map_all(sd: Mapping[str, torch.Tensor], rules: list, reverse: bool, what: str) -> dict[str, torch.Tensor]:
    """Apply `map_key` to every key; unknown keys mean an architecture this converter does not know."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        new = map_key(key, rules, reverse)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ArtifactError(
            f"the {what} has {len(unknown)} weights this converter does not know "
            f"(e.g. {', '.join(unknown[:4])}); it is not a standard SD1/SD2/SDXL layout"
        )
    return out


def unet_to_ldm(sd: Mapping[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """diffusers UNet state dict -> LDM keys without the `model.diffusion_model.` prefix."""
    return _map_all(sd, unet_rules(family), False, "UNet")


def unet_from_ldm(sd: Mapping[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """LDM UNet keys (prefix stripped) -> diffusers UNet state dict."""
    return _map_all(sd, unet_rules(family), True, "UNet")


def _is_vae_attn_weight(ldm_key: str) -> bool:
    parts = ldm_key.split(".")
    return ".mid.attn_1." in ldm_key and parts[-1] == "weight" and parts[-2] in ("q", "k", "v", "proj_out")


def vae_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers VAE state dict -> LDM keys (prefix stripped); attention linears become 1x1 convs."""
    legacy = {}
    for key, value in sd.items():
        for old, new in _VAE_LEGACY_ATTN:
            key = key.replace(f".attentions.0.{old}", f".attentions.0.{new}")
        legacy[key] = value
    out = _map_all(legacy, vae_rules(), False, "VAE")
    return {k: v.reshape(*v.shape, 1, 1) if _is_vae_attn_weight(k) and v.dim() == 2 else v for k, v in out.items()}


def vae_from_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM VAE keys (prefix stripped) -> diffusers VAE state dict; 1x1 conv attention weights become linears."""
    squeezed = {
        k: v.reshape(v.shape[0], v.shape[1]) if _is_vae_attn_weight(k) and v.dim() > 2 else v for k, v in sd.items()
    }
    return _map_all(squeezed, vae_rules(), True, "VAE")


def hf_clip_from_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM HF-CLIP keys (prefix stripped) -> transformers keys; fixes old files lacking `text_model.`."""
    out = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue  # a buffer only old files carry; transformers rebuilds it
        out[key if key.startswith("text_model.") else "text_model." + key] = value
    return out


def openclip_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP keys -> OpenCLIP keys (prefix stripped): q/k/v concatenated, text_projection transposed."""
    out: dict[str, torch.Tensor] = {}
    globals_ = dict(_OPENCLIP_GLOBALS)
    for key, value in sd.items():
        if key in globals_:
            out[globals_[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()  # LDM applies it as x @ P, nn.Linear as x @ W.T
        elif key.startswith(_HF_LAYERS):
            layer, rest = key[len(_HF_LAYERS) :].split(".", 1)
            name = _openclip_layer_name(rest, sd, f"{_HF_LAYERS}{layer}.")
            if name is not None:
                out[f"{_OC_LAYERS}{layer}.{name[0]}"] = name[1]
        elif not key.endswith("position_ids"):
            raise ArtifactError(f"the OpenCLIP text encoder has a weight this converter does not know: {key}")
    return out


def _openclip_layer_name(
    rest: str, sd: Mapping[str, torch.Tensor], layer_prefix: str
) -> tuple[str, torch.Tensor] | None:
    """OpenCLIP name and value of one layer weight; q/k/v are emitted once, as in_proj, when q is seen."""
    for proj in _QKV:
        if rest.startswith(f"self_attn.{proj}."):
            if proj != "q_proj":
                return None
            kind = rest.rsplit(".", 1)[1]
            parts = [sd[f"{layer_prefix}self_attn.{p}.{kind}"] for p in _QKV]
            return f"attn.in_proj_{kind}", torch.cat(parts, dim=0)
    for a, b in _OPENCLIP_LAYER_RENAMES:
        if rest.startswith(a):
            return b + rest[len(a) :], sd[layer_prefix + rest]
    raise ArtifactError(
        f"the OpenCLIP text encoder has a layer weight this converter does not know: {layer_prefix}{rest}"
    )


def openclip_from_ldm(
    sd: Mapping[str, torch.Tensor], drop_layer: int | None, keep_projection: bool
) -> dict[str, torch.Tensor]:
    """OpenCLIP keys (prefix stripped) -> transformers CLIP keys; in_proj split in thirds, `drop_layer` skipped."""
    out: dict[str, torch.Tensor] = {}
    globals_ = {ldm: dif for dif, ldm in _OPENCLIP_GLOBALS}
    for key, value in sd.items():
        if key in globals_:
            out[globals_[key]] = value
        elif key == "text_projection":
            if keep_projection:
                out["text_projection.weight"] = value.t().contiguous()
        elif key.startswith(_OC_LAYERS):
            layer, rest = key[len(_OC_LAYERS) :].split(".", 1)
            if drop_layer is not None and int(layer) == drop_layer:
                continue
            out.update(hf_layer_weights(f"{_HF_LAYERS}{layer}.", rest, value))
        elif key not in ("logit_scale", "attn_mask"):
            raise ArtifactError(f"the OpenCLIP text encoder has a weight this converter does not know: {key}")
    return out


def hf_layer_weights(prefix: str, rest: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers weights of one OpenCLIP layer weight (three of them for in_proj); `rest` is the name inside
    the layer (`attn.in_proj_weight`, `mlp.c_fc.weight`), `prefix` the transformers layer (`...layers.3.`)."""
    if rest.startswith("attn.in_proj_"):
        kind = rest[len("attn.in_proj_") :]
        return {f"{prefix}self_attn.{p}.{kind}": part for p, part in zip(_QKV, value.chunk(3, dim=0))}  # noqa: B905
    for dif, ldm in _OPENCLIP_LAYER_RENAMES:
        if rest.startswith(ldm):
            return {prefix + dif + rest[len(ldm) :]: value}
    raise ArtifactError(f"the OpenCLIP text encoder has a layer weight this converter does not know: {prefix}{rest}")


def with_prefix(prefix: str, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every key of `sd` with `prefix` in front."""
    return {prefix + k: v for k, v in sd.items()}


def strip_prefix(prefix: str, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of `sd` whose key starts with `prefix`, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
