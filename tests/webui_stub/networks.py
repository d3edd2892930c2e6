"""Stand-in for the built-in Lora extension's `networks.py` (extensions-builtin/Lora, v1.10.1), re-implemented from
reading it, as far as training meets it:

- naming (`assign_network_names_to_compvis_modules`): the UNet's modules as `diffusion_model_...`, the text encoders
  inside their wrappers as `transformer_text_model_...` (SD1), `model_transformer_resblocks_...` (SD2),
  `0_...` / `1_...` (SDXL's embedders);
- loading (`load_network`): a key is split at its first "."; the prefix goes through
  `convert_diffusers_name_to_compvis`, then the lookups in the real order (direct, `_[qkv]_proj` cut off for
  OpenCLIP's MultiheadAttention, `lora_unet` -> `diffusion_model`, `lora_te1_text_model` -> `0_transformer_text_model`
  else `transformer_text_model`); keys that match nothing are skipped silently, as there;
- the module types (`module_types`, tried in the real order; a module no type accepts fails the whole file) with the
  v1.10.1 maths of network.py (`calc_scale`: alpha / dim where the type sets a dim, else 1; `finalize_updown`; DoRA's
  `apply_weight_decompose` per input column; the multiplier `te` when "transformer" is in the first 20 characters of
  the module key, else `unet`) and of network_lora (up/down rebuilt as Linear/Conv2d, `dyn`), network_hada,
  network_lokr, network_ia3, network_full, network_norm (extra bias), network_glora (v1.10.1's layout, scale 1) and
  network_oft (`oft_blocks`, the constraint, scale 1), read from those files;
- applying (`network_apply_weights`): patched Linear / Conv2d / GroupNorm / LayerNorm / MultiheadAttention forwards
  merge the loaded networks
  into the weights on first use, keep a CPU backup and keep them merged until another set is asked for;
  MultiheadAttention gets q/k/v into its `in_proj_weight` thirds and out into `out_proj.weight`;
- listing (`list_available_networks`): `cmd_opts.lora_dir` walked for .pt/.ckpt/.safetensors, alias from
  `ss_output_name`, hash from `sshs_model_hash` (else the data-section sha256), version from `ss_base_model_version`
  / `ss_v2`.

Test aids: `install()` / `uninstall()` put the patches on and off; `Network` / `ConstantModule` are a minimal network
(its module adds a constant to a layer's weight); `activate(networks)` is what a generation with them leaves behind.
Not re-implemented: the CP/Tucker (`lora_mid`, `hada_t1`, `lokr_t2`), old-OFT (`oft_diag`) and BOFT forms, bundled
embeddings, `lora_functional`.
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


# --- module types (network.py and network_*.py) ------------------------------------------------------------------
class NetworkModule:
    """network.NetworkModule: what every type shares (scale, DoRA, multiplier), as v1.10.1 computes it."""

    def __init__(self, net, sd_key, weights, sd_module):
        self.network, self.sd_key, self.sd_module = net, sd_key, sd_module
        if hasattr(sd_module, "weight"):
            self.shape = sd_module.weight.shape
        elif isinstance(sd_module, torch.nn.MultiheadAttention):
            self.shape = sd_module.out_proj.weight.shape  # every projection is width x width
        else:
            self.shape = None
        self.dim = None
        self.bias = weights.get("bias")
        self.alpha = weights["alpha"].item() if "alpha" in weights else None
        self.scale = weights["scale"].item() if "scale" in weights else None
        self.dora_scale = weights.get("dora_scale")
        self.dora_norm_dims = len(self.shape) - 1

    def multiplier(self):
        return self.network.te_multiplier if "transformer" in self.sd_key[:20] else self.network.unet_multiplier

    def calc_scale(self):
        if self.scale is not None:
            return self.scale
        if self.dim is not None and self.alpha is not None:
            return self.alpha / self.dim
        return 1.0

    def apply_weight_decompose(self, updown, orig_weight):
        """v1.10.1: the merged weight's norm per input column (dim 1 first, the rest flattened)."""
        orig_weight = orig_weight.to(updown.dtype)
        dora_scale = self.dora_scale.to(device=orig_weight.device, dtype=updown.dtype)
        merged = updown.to(orig_weight.device) + orig_weight
        columns = merged.shape[1]
        norm = merged.transpose(0, 1).reshape(columns, -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(columns, *[1] * self.dora_norm_dims).transpose(0, 1)
        return merged * (dora_scale / norm) - orig_weight

    def finalize_updown(self, updown, orig_weight, output_shape, ex_bias=None):
        if self.bias is not None:
            updown = (updown.reshape(self.bias.shape) + self.bias.to(orig_weight.device, updown.dtype))
            updown = updown.reshape(output_shape)
        if len(output_shape) == 4:
            updown = updown.reshape(output_shape)
        if orig_weight.size().numel() == updown.size().numel():
            updown = updown.reshape(orig_weight.shape)
        if ex_bias is not None:
            ex_bias = ex_bias * self.multiplier()
        updown = updown * self.calc_scale()
        if self.dora_scale is not None:
            updown = self.apply_weight_decompose(updown, orig_weight)
        return updown * self.multiplier(), ex_bias


def _rebuild(up, down, shape, dyn=None):
    """lyco_helpers.rebuild_conventional."""
    up, down = up.reshape(up.size(0), -1), down.reshape(down.size(0), -1)
    if dyn is not None:
        up, down = up[:, :dyn], down[:dyn, :]
    return (up @ down).reshape(shape)


class NetworkModuleLora(NetworkModule):
    """network_lora.NetworkModuleLora without the mid (CP) branch."""

    def __init__(self, net, sd_key, weights, sd_module):
        super().__init__(net, sd_key, weights, sd_module)
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

    def calc_updown(self, orig_weight):
        up = self.up_model.weight.to(orig_weight.device)
        down = self.down_model.weight.to(orig_weight.device)
        output_shape = [up.size(0), down.size(1), *(down.shape[2:] if down.dim() == 4 else ())]
        updown = _rebuild(up, down, output_shape, self.network.dyn_dim)
        return self.finalize_updown(updown, orig_weight, output_shape)


class NetworkModuleHada(NetworkModule):
    """network_hada: (w1a @ w1b) * (w2a @ w2b) in float32; dim = w1b's rows (no t1/t2 CP branch)."""

    def __init__(self, net, sd_key, weights, sd_module):
        super().__init__(net, sd_key, weights, sd_module)
        self.w1a, self.w1b = weights["hada_w1_a"], weights["hada_w1_b"]
        self.w2a, self.w2b = weights["hada_w2_a"], weights["hada_w2_b"]
        self.dim = self.w1b.shape[0]

    def calc_updown(self, orig_weight):
        w1a, w1b, w2a, w2b = (t.to(orig_weight.device, dtype=torch.float32)
                              for t in (self.w1a, self.w1b, self.w2a, self.w2b))
        output_shape = [w1a.size(0), w1b.size(1), *(w1b.shape[2:] if w1b.dim() == 4 else ())]
        updown = _rebuild(w1a, w1b, output_shape) * _rebuild(w2a, w2b, output_shape)
        return self.finalize_updown(updown, orig_weight, output_shape)


class NetworkModuleLokr(NetworkModule):
    """network_lokr: kron(w1, w2), w1 / w2 whole or a pair; dim from a pair's b (none: scale 1); no t2 branch."""

    def __init__(self, net, sd_key, weights, sd_module):
        super().__init__(net, sd_key, weights, sd_module)
        self.w = {k: weights.get(k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}
        for b in ("lokr_w1_b", "lokr_w2_b"):
            if self.w[b] is not None:
                self.dim = self.w[b].shape[0]

    def _side(self, n, device):
        whole = self.w[f"lokr_w{n}"]
        if whole is not None:
            return whole.to(device)
        return self.w[f"lokr_w{n}_a"].to(device) @ self.w[f"lokr_w{n}_b"].to(device)

    def calc_updown(self, orig_weight):
        w1, w2 = self._side(1, orig_weight.device), self._side(2, orig_weight.device)
        output_shape = [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if orig_weight.dim() == 4:
            output_shape = orig_weight.shape
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2.contiguous()).reshape(output_shape)
        return self.finalize_updown(updown, orig_weight, output_shape)


class NetworkModuleIa3(NetworkModule):
    """network_ia3: weight * w, w per output row, or per input column when on_input."""

    def __init__(self, net, sd_key, weights, sd_module):
        super().__init__(net, sd_key, weights, sd_module)
        self.w, self.on_input = weights["weight"], weights["on_input"].item()

    def calc_updown(self, orig_weight):
        w = self.w.to(orig_weight.device)
        output_shape = [w.size(0), orig_weight.size(1)]
        if self.on_input:
            output_shape.reverse()
        else:
            w = w.reshape(-1, 1)
        return self.finalize_updown(orig_weight * w, orig_weight, output_shape)


class NetworkModuleFull(NetworkModule):
    """network_full: the change is `diff` (and the bias change `diff_b`)."""

    def __init__(self, net, sd_key, weights, sd_module):
        super().__init__(net, sd_key, weights, sd_module)
        self.weight, self.ex_bias = weights["diff"], weights.get("diff_b")

    def calc_updown(self, orig_weight):
        ex_bias = None if self.ex_bias is None else self.ex_bias.to(orig_weight.device, dtype=torch.float32)
        updown = self.weight.to(orig_weight.device, dtype=torch.float32)
        return self.finalize_updown(updown, orig_weight, self.weight.shape, ex_bias)


class NetworkModuleNorm(NetworkModule):
    """network_norm: the norm's weight change `w_norm` and bias change `b_norm`."""

    def __init__(self, net, sd_key, weights, sd_module):
        super().__init__(net, sd_key, weights, sd_module)
        self.w_norm, self.b_norm = weights["w_norm"], weights["b_norm"]

    def calc_updown(self, orig_weight):
        updown = self.w_norm.to(orig_weight.device, dtype=torch.float32)
        ex_bias = self.b_norm.to(orig_weight.device, dtype=torch.float32)
        return self.finalize_updown(updown, orig_weight, self.w_norm.shape, ex_bias)


class NetworkModuleGLora(NetworkModule):
    """network_glora v1.10.1: b2 @ b1 + W @ a2 @ a1, no dim (scale 1)."""

    def __init__(self, net, sd_key, weights, sd_module):
        super().__init__(net, sd_key, weights, sd_module)
        self.w1a, self.w1b = weights["a1.weight"], weights["b1.weight"]
        self.w2a, self.w2b = weights["a2.weight"], weights["b2.weight"]

    def calc_updown(self, orig_weight):
        w1a, w1b, w2a, w2b = (t.to(orig_weight.device) for t in (self.w1a, self.w1b, self.w2a, self.w2b))
        output_shape = [w1a.size(0), w1b.size(1)]
        updown = (w2b @ w1b) + ((orig_weight.to(dtype=w1a.dtype) @ w2a) @ w1a)
        return self.finalize_updown(updown, orig_weight, output_shape)


class NetworkModuleOFT(NetworkModule):
    """network_oft, the `oft_blocks` form: Cayley rotation per block of output rows, the norm of Q clamped to
    alpha * out when alpha (a tensor) is not 0; scale fixed at 1."""

    def __init__(self, net, sd_key, weights, sd_module):
        super().__init__(net, sd_key, weights, sd_module)
        self.scale = 1.0
        self.oft_blocks = weights["oft_blocks"]
        self.alpha = weights.get("alpha")
        self.dim = self.oft_blocks.shape[0]
        if isinstance(sd_module, torch.nn.MultiheadAttention):
            out_dim = sd_module.embed_dim
        else:
            out_dim = sd_module.out_features if isinstance(sd_module, torch.nn.Linear) else sd_module.out_channels
        self.num_blocks, self.block_size = self.dim, out_dim // self.dim
        self.constraint = (0 if self.alpha is None else self.alpha) * out_dim

    def calc_updown(self, orig_weight):
        blocks = self.oft_blocks.to(orig_weight.device)
        eye = torch.eye(self.block_size, device=blocks.device)
        q = blocks - blocks.transpose(-1, -2)
        if self.constraint != 0:
            norm = torch.norm(q.flatten())
            q = q * ((torch.clamp(norm, max=self.constraint.to(blocks.device)) + 1e-8) / (norm + 1e-8))
        # per block (the real one inverts the batch at once; torch's batched CPU inverse fails with several threads
        # on this test machine's build)
        rotation = torch.matmul(eye + q, torch.stack([m.float().inverse() for m in eye - q]))
        grouped = orig_weight.reshape(self.num_blocks, self.block_size, *orig_weight.shape[1:])
        merged = torch.einsum("knm,kn...->km...", rotation, grouped).reshape(orig_weight.shape)
        return self.finalize_updown(merged - orig_weight, orig_weight, orig_weight.shape)


def _accepts_all(*parts):
    return lambda w: all(p in w for p in parts)


# networks.module_types, in its order: the first type whose keys a module has takes it.
module_types = [
    (_accepts_all("lora_up.weight", "lora_down.weight"), NetworkModuleLora),
    (_accepts_all("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), NetworkModuleHada),
    (_accepts_all("weight"), NetworkModuleIa3),
    (lambda w: ("lokr_w1" in w or ("lokr_w1_a" in w and "lokr_w1_b" in w))
     and ("lokr_w2" in w or ("lokr_w2_a" in w and "lokr_w2_b" in w)), NetworkModuleLokr),
    (_accepts_all("diff"), NetworkModuleFull),
    (_accepts_all("w_norm", "b_norm"), NetworkModuleNorm),
    (_accepts_all("a1.weight", "a2.weight", "alpha", "b1.weight", "b2.weight"), NetworkModuleGLora),
    (lambda w: "oft_blocks" in w or "oft_diag" in w, NetworkModuleOFT),
]


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
        matched.setdefault(key, (sd_module, {}, key_network))[1][part] = weight
    for key, (sd_module, weights, network_key) in matched.items():
        kind = next((kind for accepts, kind in module_types if accepts(weights)), None)
        if kind is None:
            raise AssertionError(f"Could not find a module type that would accept those keys: {', '.join(weights)}")
        net.modules[key] = kind(net, key, weights, sd_module)
        net.modules[key].network_key = network_key  # NetworkWeights.network_key: the first file key of the module
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
            updown, ex_bias = module.calc_updown(self.weight)
            self.weight.copy_((self.weight.to(dtype=updown.dtype) + updown).to(dtype=self.weight.dtype))
            if ex_bias is not None and self.bias is not None:
                self.bias.copy_((self.bias + ex_bias).to(dtype=self.bias.dtype))
            return
        parts = [net.modules.get(f"{name}_{p}") for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
        if isinstance(self, torch.nn.MultiheadAttention) and all(parts):
            q, k, v = self.in_proj_weight.chunk(3, 0)
            self.in_proj_weight += torch.vstack([parts[0].calc_updown(q)[0], parts[1].calc_updown(k)[0],
                                                 parts[2].calc_updown(v)[0]])
            updown_out, ex_bias = parts[3].calc_updown(self.out_proj.weight)
            self.out_proj.weight += updown_out
            if ex_bias is not None:
                self.out_proj.bias += ex_bias


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


_PATCHED = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention)


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
