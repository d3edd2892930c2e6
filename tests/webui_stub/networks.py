"""Stand-in for the built-in Lora extension's `networks.py` (extensions-builtin/Lora, v1.10.1), re-implemented from
reading it, as far as training meets it:

- naming (`assign_network_names_to_compvis_modules`): the UNet's modules as `diffusion_model_...`, the text encoders
  inside their wrappers as `transformer_text_model_...` (SD1), `model_transformer_resblocks_...` (SD2),
  `0_...` / `1_...` (SDXL's embedders);
- loading (`load_network`): a key is split at its first "."; the prefix goes through
  `convert_diffusers_name_to_compvis`, then the lookups in the real order (direct, `_[qkv]_proj` cut off for
  OpenCLIP's MultiheadAttention, `lora_unet` -> `diffusion_model`, `lora_te1_text_model` -> `0_transformer_text_model`
  else `transformer_text_model`); keys that match nothing are skipped silently, as there;
- the LoRA module type (`network_lora.NetworkModuleLora`): up/down rebuilt as Linear/Conv2d, rank = down.shape[0],
  scale = alpha / rank (1 without alpha), the multiplier `te` when "transformer" is in the first 20 characters of the
  module key, else `unet`;
- applying (`network_apply_weights`): patched Linear / Conv2d / MultiheadAttention forwards merge the loaded networks
  into the weights on first use, keep a CPU backup and keep them merged until another set is asked for;
  MultiheadAttention gets q/k/v into its `in_proj_weight` thirds and out into `out_proj.weight`;
- listing (`list_available_networks`): `cmd_opts.lora_dir` walked for .pt/.ckpt/.safetensors, alias from
  `ss_output_name`, hash from `sshs_model_hash` (else the data-section sha256), version from `ss_base_model_version`
  / `ss_v2`.

Test aids: `install()` / `uninstall()` put the patches on and off; `Network` / `ConstantModule` are a minimal network
(its module adds a constant to a layer's weight); `activate(networks)` is what a generation with them leaves behind.
Not re-implemented: LoHa/LoKr/IA3/OFT/full/norm types, DoRA, bundled embeddings, the GroupNorm/LayerNorm patches,
`lora_functional`.
"""

from __future__ import annotations

import hashlib
import os
import re

import torch

from modules import devices, shared

loaded_networks: list = []
available_networks: dict = {}
available_network_aliases: dict = {}
forbidden_network_aliases: dict = {}
networks_in_memory: dict = {}
_originals: dict = {}
errors: dict = {}  # network name -> failed layers (the extension's "Networks with errors" comment)


# --- naming and key conversion ---------------------------------------------------------------------------------
def assign_network_names_to_compvis_modules(sd_model):
    """As on_model_loaded does (the real one reads shared.sd_model, the same object by then)."""
    mapping = {}
    if getattr(sd_model, "is_sdxl", False):
        roots = [(f"{i}_", e.wrapped) for i, e in enumerate(sd_model.conditioner.embedders) if hasattr(e, "wrapped")]
    else:
        roots = [("", getattr(sd_model.cond_stage_model, "wrapped", sd_model.cond_stage_model))]
    roots.append(("", sd_model.model))
    for prefix, root in roots:
        for name, module in root.named_modules():
            network_name = prefix + name.replace(".", "_")
            mapping[network_name] = module
            module.network_layer_name = network_name
    sd_model.network_layer_mapping = mapping


_RESNET_SUFFIXES = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                    "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _openclip(layer, rest, prefix):
    for old, new in (("mlp_fc1", "mlp_c_fc"), ("mlp_fc2", "mlp_c_proj")):
        if old in rest:
            return f"{prefix}model_transformer_resblocks_{layer}_{rest.replace(old, new)}"
    return f"{prefix}model_transformer_resblocks_{layer}_{rest.replace('self_attn', 'attn')}"


def convert_diffusers_name_to_compvis(key, is_sd2):
    """kohya/diffusers-style names to the WebUI's module names, rule by rule as the real function."""
    def match(pattern):
        found = re.match(pattern, key)
        return None if found is None else [int(g) if re.match(r"\d+", g) else g for g in found.groups()]

    if (m := match(r"lora_unet_conv_in(.*)")) is not None:
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if (m := match(r"lora_unet_conv_out(.*)")) is not None:
        return f"diffusion_model_out_2{m[0]}"
    if (m := match(r"lora_unet_time_embedding_linear_(\d+)(.*)")) is not None:
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if (m := match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = _RESNET_SUFFIXES.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if (m := match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = _RESNET_SUFFIXES.get(m[2], m[2]) if m[0] == "resnets" else m[2]
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if (m := match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = _RESNET_SUFFIXES.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if (m := match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv")) is not None:
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if (m := match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv")) is not None:
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if (m := match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)")) is not None:
        return _openclip(m[0], m[1], "") if is_sd2 else f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    if (m := match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)")) is not None:
        return _openclip(m[0], m[1], "1_")
    return key


# --- the LoRA module type ---------------------------------------------------------------------------------------
class NetworkModuleLora:
    """network_lora.NetworkModuleLora without the mid (CP) and DoRA branches."""

    def __init__(self, net, sd_key, weights, sd_module):
        self.network, self.sd_key, self.sd_module = net, sd_key, sd_module
        self.alpha = weights["alpha"].item() if "alpha" in weights else None
        self.scale = weights["scale"].item() if "scale" in weights else None
        self.up_model = self._module(weights["lora_up.weight"], "lora_up.weight")
        self.down_model = self._module(weights["lora_down.weight"], "lora_down.weight")
        self.dim = weights["lora_down.weight"].shape[0]

    def _module(self, weight, key):
        linear = type(self.sd_module) in (torch.nn.Linear, torch.nn.modules.linear.NonDynamicallyQuantizableLinear,
                                          torch.nn.MultiheadAttention)
        if linear:
            weight = weight.reshape(weight.shape[0], -1)
            module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        elif type(self.sd_module) is torch.nn.Conv2d and key == "lora_down.weight":
            if weight.dim() == 2:
                weight = weight.reshape(weight.shape[0], -1, 1, 1)
            if tuple(weight.shape[2:]) != (1, 1):
                module = torch.nn.Conv2d(weight.shape[1], weight.shape[0], self.sd_module.kernel_size,
                                         self.sd_module.stride, self.sd_module.padding, bias=False)
            else:
                module = torch.nn.Conv2d(weight.shape[1], weight.shape[0], (1, 1), bias=False)
        elif type(self.sd_module) is torch.nn.Conv2d:
            module = torch.nn.Conv2d(weight.shape[1], weight.shape[0], (1, 1), bias=False)
        else:
            raise AssertionError(f"Lora layer {self.sd_key} matched a layer with unsupported type: "
                                 f"{type(self.sd_module).__name__}")
        with torch.no_grad():
            module.weight.copy_(weight.reshape(module.weight.shape))
        return module.to(device=devices.cpu, dtype=devices.dtype).requires_grad_(False)

    def multiplier(self):
        return self.network.te_multiplier if "transformer" in self.sd_key[:20] else self.network.unet_multiplier

    def calc_scale(self):
        if self.scale is not None:
            return self.scale
        if self.dim is not None and self.alpha is not None:
            return self.alpha / self.dim
        return 1.0

    def calc_updown(self, orig_weight):
        up = self.up_model.weight.to(orig_weight.device)
        down = self.down_model.weight.to(orig_weight.device)
        output_shape = [up.size(0), down.size(1), *(down.shape[2:] if down.dim() == 4 else ())]
        dyn = self.network.dyn_dim
        up, down = up.reshape(up.size(0), -1), down.reshape(down.size(0), -1)
        if dyn is not None:
            up, down = up[:, :dyn], down[:dyn, :]
        updown = (up @ down).reshape(output_shape)
        if orig_weight.numel() == updown.numel():
            updown = updown.reshape(orig_weight.shape)
        return updown * self.calc_scale() * self.multiplier(), None


class ConstantModule:
    """A test network module whose weight change is a constant."""

    def __init__(self, value):
        self.value = value

    def calc_updown(self, weight):
        return torch.full_like(weight, self.value), None


class Network:
    def __init__(self, name, modules, multiplier=1.0, network_on_disk=None):
        self.name = name
        self.modules = modules  # network layer name -> module
        self.te_multiplier = self.unet_multiplier = multiplier
        self.dyn_dim = None
        self.network_on_disk = network_on_disk
        self.mtime = None


# --- files on disk ----------------------------------------------------------------------------------------------
class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name, self.filename = name, filename
        self.metadata = {}
        if filename.lower().endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(filename, framework="pt") as handle:
                self.metadata = dict(handle.metadata() or {})
        self.alias = self.metadata.get("ss_output_name", name)
        self.hash = self.metadata.get("sshs_model_hash") or _addnet_hash(filename)
        self.shorthash = self.hash[:12]
        self.sd_version = self.detect_version()

    def detect_version(self):
        if str(self.metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
            return "SDXL"
        if str(self.metadata.get("ss_v2", "")) == "True":
            return "SD2"
        return "SD1" if self.metadata else "Unknown"


def _addnet_hash(filename):
    digest = hashlib.sha256()
    with open(filename, "rb") as handle:
        if filename.lower().endswith(".safetensors"):
            handle.seek(8 + int.from_bytes(handle.read(8), "little"))
        digest.update(handle.read())
    return digest.hexdigest()


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for root, _, files in os.walk(shared.cmd_opts.lora_dir, followlinks=True):
        for file in sorted(files):
            if os.path.splitext(file)[1].lower() not in (".pt", ".ckpt", ".safetensors"):
                continue
            entry = NetworkOnDisk(os.path.splitext(file)[0], os.path.join(root, file))
            available_networks[entry.name] = entry
            if entry.alias in available_network_aliases:
                forbidden_network_aliases[entry.alias.lower()] = 1
            available_network_aliases[entry.name] = entry
            available_network_aliases[entry.alias] = entry


def _read_state_dict(filename):
    if filename.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(filename, device="cpu")
    return torch.load(filename, map_location="cpu", weights_only=True)


def _lookup(sd_model, key_network_without_parts, is_sd2):
    mapping = sd_model.network_layer_mapping
    key = convert_diffusers_name_to_compvis(key_network_without_parts, is_sd2)
    sd_module = mapping.get(key)
    if sd_module is None and (m := re.match(r"(.*)_([qkv]_proj)$", key)):
        sd_module = mapping.get(m.group(1))
    if sd_module is None and "lora_unet" in key_network_without_parts:
        key = key_network_without_parts.replace("lora_unet", "diffusion_model")
        sd_module = mapping.get(key)
    elif sd_module is None and "lora_te1_text_model" in key_network_without_parts:
        key = key_network_without_parts.replace("lora_te1_text_model", "0_transformer_text_model")
        sd_module = mapping.get(key)
        if sd_module is None:
            key = key_network_without_parts.replace("lora_te1_text_model", "transformer_text_model")
            sd_module = mapping.get(key)
    return key, sd_module


def load_network(name, network_on_disk):
    """Read a file and match its keys to the loaded model's modules; returns (network, keys that matched nothing)."""
    sd_model = shared.sd_model
    net = Network(name, {}, network_on_disk=network_on_disk)
    net.mtime = os.path.getmtime(network_on_disk.filename)
    is_sd2 = "model_transformer_resblocks" in sd_model.network_layer_mapping
    matched, failed = {}, {}
    for key_network, weight in _read_state_dict(network_on_disk.filename).items():
        prefix, _, part = key_network.partition(".")
        key, sd_module = _lookup(sd_model, prefix, is_sd2)
        if sd_module is None:
            failed[key_network] = key
            continue
        matched.setdefault(key, (sd_module, {}))[1][part] = weight
    for key, (sd_module, weights) in matched.items():
        if not all(x in weights for x in ("lora_up.weight", "lora_down.weight")):
            raise AssertionError(f"Could not find a module type that would accept those keys: {', '.join(weights)}")
        net.modules[key] = NetworkModuleLora(net, key, weights, sd_module)
    net.keys_failed_to_match = failed
    return net


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    """What `<lora:NAME:te:unet:dyn>` in a prompt makes the extension do before a generation."""
    if any(available_network_aliases.get(n) is None for n in names):
        list_available_networks()
    loaded_networks.clear()
    for i, name in enumerate(names):
        on_disk = available_networks.get(name) if name.lower() in forbidden_network_aliases else \
            available_network_aliases.get(name)
        if on_disk is None:
            continue
        net = networks_in_memory.get(name)
        if net is None or os.path.getmtime(on_disk.filename) > net.mtime:
            net = networks_in_memory[name] = load_network(name, on_disk)
        net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
        net.unet_multiplier = unet_multipliers[i] if unet_multipliers else 1.0
        net.dyn_dim = dyn_dims[i] if dyn_dims else None
        loaded_networks.append(net)


def activate_from_prompt_params(params_list):
    """extra_networks_lora.ExtraNetworkLora.activate: positional te[, unet[, dyn]] or named te=, unet=, dyn=."""
    names, te, unet, dyn = [], [], [], []
    for items in params_list:
        positional = [x for x in items if "=" not in x]
        named = dict(x.split("=", 1) for x in items if "=" in x)
        names.append(positional[0])
        te_multiplier = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
        te.append(te_multiplier)
        unet.append(float(named.get("unet", positional[2] if len(positional) > 2 else te_multiplier)))
        dyn_value = named.get("dyn", positional[3] if len(positional) > 3 else None)
        dyn.append(None if dyn_value is None else int(dyn_value))
    load_networks(names, te, unet, dyn)


# --- applying ---------------------------------------------------------------------------------------------------
def store_weights_backup(weight):
    return None if weight is None else weight.to(devices.cpu, copy=True)


def restore_weights_backup(obj, field, weight):
    if weight is None:
        setattr(obj, field, None)
        return
    getattr(obj, field).copy_(weight)


def network_restore_weights_from_backup(self):
    weights_backup = getattr(self, "network_weights_backup", None)
    bias_backup = getattr(self, "network_bias_backup", None)
    if weights_backup is None and bias_backup is None:
        return
    is_mha = isinstance(self, torch.nn.MultiheadAttention)
    if weights_backup is not None:
        if is_mha:
            restore_weights_backup(self, "in_proj_weight", weights_backup[0])
            restore_weights_backup(self.out_proj, "weight", weights_backup[1])
        else:
            restore_weights_backup(self, "weight", weights_backup)
    restore_weights_backup(self.out_proj if is_mha else self, "bias", bias_backup)


def _backup(self, current_names):
    is_mha = isinstance(self, torch.nn.MultiheadAttention)
    if getattr(self, "network_weights_backup", None) is None:
        if current_names != ():
            raise RuntimeError("no backup weights found and current weights are not unchanged")
        self.network_weights_backup = (store_weights_backup(self.in_proj_weight),
                                       store_weights_backup(self.out_proj.weight)) if is_mha else \
            store_weights_backup(self.weight)
    if getattr(self, "network_bias_backup", None) is None:
        owner = self.out_proj if is_mha else self
        self.network_bias_backup = store_weights_backup(owner.bias) if getattr(owner, "bias", None) is not None \
            else None


def _merge(self, net, name):
    module = net.modules.get(name)
    with torch.no_grad():
        if module is not None and hasattr(self, "weight"):
            updown, _ = module.calc_updown(self.weight)
            self.weight.copy_((self.weight.to(dtype=updown.dtype) + updown).to(dtype=self.weight.dtype))
            return
        parts = [net.modules.get(f"{name}_{p}") for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
        if isinstance(self, torch.nn.MultiheadAttention) and all(parts):
            q, k, v = self.in_proj_weight.chunk(3, 0)
            self.in_proj_weight += torch.vstack([parts[0].calc_updown(q)[0], parts[1].calc_updown(k)[0],
                                                 parts[2].calc_updown(v)[0]])
            self.out_proj.weight += parts[3].calc_updown(self.out_proj.weight)[0]


def network_apply_weights(self):
    network_layer_name = getattr(self, "network_layer_name", None)
    if network_layer_name is None:
        return
    current_names = getattr(self, "network_current_names", ())
    wanted_names = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)
    if wanted_names != ():
        _backup(self, current_names)
    if current_names != wanted_names:
        network_restore_weights_from_backup(self)
        for net in loaded_networks:
            try:
                _merge(self, net, network_layer_name)
            except RuntimeError:
                errors[net.name] = errors.get(net.name, 0) + 1
        self.network_current_names = wanted_names


def network_reset_cached_weight(self):
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None


_PATCHED = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.MultiheadAttention)


def _forward(kind):
    def forward(self, *args, **kwargs):
        if shared.opts.lora_functional:
            raise NotImplementedError("the stand-in does not do lora_functional")
        network_apply_weights(self)
        return _originals[kind, "forward"](self, *args, **kwargs)
    return forward


def _load_from_state_dict(kind):
    def load(self, *args, **kwargs):
        network_reset_cached_weight(self)
        return _originals[kind, "load"](self, *args, **kwargs)
    return load


def install(sd_model=None):
    """The extension's LoraPatches (and, on model load, the layer names)."""
    for kind in _PATCHED:
        if (kind, "forward") not in _originals:
            _originals[kind, "forward"], _originals[kind, "load"] = kind.forward, kind._load_from_state_dict
            kind.forward, kind._load_from_state_dict = _forward(kind), _load_from_state_dict(kind)
    if sd_model is not None:
        assign_network_names_to_compvis_modules(sd_model)


def uninstall():
    for kind in _PATCHED:
        if (kind, "forward") in _originals:
            kind.forward = _originals.pop((kind, "forward"))
            kind._load_from_state_dict = _originals.pop((kind, "load"))
    loaded_networks.clear()
    networks_in_memory.clear()


def activate(networks):
    """What `extra_networks_lora.activate` leaves behind for a generation with these networks."""
    loaded_networks[:] = list(networks)
