"""Stand-in for the built-in Lora extension's `networks.py` (extensions-builtin/Lora, v1.10.1), as far as training
meets it: the extension patches `torch.nn.Linear` / `Conv2d` forwards; on a layer's first forward with networks
loaded it keeps a CPU backup of the weights and merges the networks into them (`network_current_names`), and keeps
them merged after the generation until another one asks for other networks. `_load_from_state_dict` is patched to
drop the backups. The real module is imported as top-level `networks` (the extension folder is on sys.path).

Test aids: `install()` / `uninstall()` put the patches on and off; `Network` / `ConstantModule` are a minimal network
(its module adds a constant to a layer's weight); `activate(networks)` is what a generation with `<lora:...>` does.
"""

from __future__ import annotations

import torch

from modules import devices, shared

loaded_networks: list = []
_originals: dict = {}


class ConstantModule:
    """A network module whose weight change is a constant (a stand-in for network_lora.NetworkModuleLora)."""

    def __init__(self, value):
        self.value = value

    def calc_updown(self, weight):
        return torch.full_like(weight, self.value), None


class Network:
    def __init__(self, name, modules, multiplier=1.0):
        self.name = name
        self.modules = modules  # network layer name -> module
        self.te_multiplier = self.unet_multiplier = multiplier
        self.dyn_dim = None


def assign_network_names_to_compvis_modules(sd_model):
    for name, module in sd_model.named_modules():
        module.network_layer_name = name.replace(".", "_")


def store_weights_backup(weight):
    if weight is None:
        return None
    return weight.to(devices.cpu, copy=True)


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
    if weights_backup is not None:
        restore_weights_backup(self, "weight", weights_backup)
    restore_weights_backup(self, "bias", bias_backup)


def network_apply_weights(self):
    network_layer_name = getattr(self, "network_layer_name", None)
    if network_layer_name is None:
        return
    current_names = getattr(self, "network_current_names", ())
    wanted_names = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)
    weights_backup = getattr(self, "network_weights_backup", None)
    if weights_backup is None and wanted_names != ():
        if current_names != ():
            raise RuntimeError("no backup weights found and current weights are not unchanged")
        self.network_weights_backup = store_weights_backup(self.weight)
    bias_backup = getattr(self, "network_bias_backup", None)
    if bias_backup is None and wanted_names != ():
        self.network_bias_backup = store_weights_backup(self.bias) if getattr(self, "bias", None) is not None \
            else None
    if current_names != wanted_names:
        network_restore_weights_from_backup(self)
        for net in loaded_networks:
            module = net.modules.get(network_layer_name, None)
            if module is not None and hasattr(self, "weight"):
                with torch.no_grad():
                    updown, _ = module.calc_updown(self.weight)
                    self.weight.copy_((self.weight.to(dtype=updown.dtype) + updown).to(dtype=self.weight.dtype))
        self.network_current_names = wanted_names


def network_reset_cached_weight(self):
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None


def _forward(kind):
    def forward(self, input):
        if shared.opts.lora_functional:
            raise NotImplementedError("the stand-in does not do lora_functional")
        network_apply_weights(self)
        return _originals[kind, "forward"](self, input)
    return forward


def _load_from_state_dict(kind):
    def load(self, *args, **kwargs):
        network_reset_cached_weight(self)
        return _originals[kind, "load"](self, *args, **kwargs)
    return load


def install(sd_model=None):
    """The extension's LoraPatches (and, on model load, the layer names)."""
    for kind in (torch.nn.Linear, torch.nn.Conv2d):
        if (kind, "forward") not in _originals:
            _originals[kind, "forward"], _originals[kind, "load"] = kind.forward, kind._load_from_state_dict
            kind.forward, kind._load_from_state_dict = _forward(kind), _load_from_state_dict(kind)
    if sd_model is not None:
        assign_network_names_to_compvis_modules(sd_model)


def uninstall():
    for kind in (torch.nn.Linear, torch.nn.Conv2d):
        if (kind, "forward") in _originals:
            kind.forward = _originals.pop((kind, "forward"))
            kind._load_from_state_dict = _originals.pop((kind, "load"))
    loaded_networks.clear()


def activate(networks):
    """What `extra_networks_lora.activate` leaves behind for a generation with these networks."""
    loaded_networks[:] = list(networks)
