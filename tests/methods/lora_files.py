"""Helpers for the LoRA tests: a network file of any type with random (non-zero) tensors for a model, and applying a
file with our own code."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune_core.formats.lora_file import NetworkFile, base_version, read_lora, write_lora
from finetune_core.methods.lora import LoraConfig
from finetune_core.methods.lora_net import LoraNetwork
from finetune_core.methods.lora_setup import network_from_file, new_network
from finetune_core.model.interface import V_PREDICTION

# Per type: settings that shape a small file on the tiny models (conv layers where the type has them).
TYPE_SETTINGS = {
    "lora": {"rank": 2, "alpha": 3.0, "conv_rank": 3, "conv_alpha": 1.5},
    "loha": {"rank": 2, "alpha": 3.0, "conv_rank": 2, "conv_alpha": 1.0},
    "lokr": {"rank": 2, "alpha": 3.0, "conv_rank": 2, "conv_alpha": 1.0, "factor": 4},
    "ia3": {},
    "full": {},
    "norm": {},
    "oft": {"blocks": 4, "constraint": 0.5},
    "glora": {"rank": 2, "alpha": 3.0},
}
DORA_TYPES = ("lora", "loha", "lokr")
# random changes of a similar size per type (LoHa multiplies two products, full replaces whole weights)
NOISE = {"loha": 0.05, "full": 0.01}
CASES = [(name, False) for name in TYPE_SETTINGS] + [(name, True) for name in DORA_TYPES]


def config_for(network: str = "lora", dora: bool = False, text: bool = True, **extra) -> LoraConfig:
    return LoraConfig(network=network, dora=dora, train_text_encoder=text and network != "norm",
                      **{**TYPE_SETTINGS[network], **extra})


def random_lora_file(model, path: Path, conv: bool = True, seed: int = 5, network: str = "lora",
                     dora: bool = False) -> Path:
    """Every layer the type adapts (UNet transformer, resnet and sampler layers where it has conv forms, the text
    encoders), every tensor randomised so that every module changes its layer; written in float32."""
    extra = {} if conv or network not in DORA_TYPES else {"conv_rank": 0, "conv_alpha": 0.0}
    config = config_for(network, dora, **extra)
    net = new_network(model.adapter_targets(), config, seed, model.adapter_weight)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in net.by_name().values():
            for name, param in adapter.weights.items():
                noise = torch.randn(param.shape, generator=generator)
                if name == "dora_scale":
                    param.mul_(1 + 0.1 * noise)
                else:
                    param.add_(NOISE.get(network, 0.2) * noise)
    version = base_version(model.family, model.prediction_type == V_PREDICTION)
    metadata = {"ss_base_model_version": version, "ss_v2": str(model.family == "sd2"), "ss_output_name": path.stem}
    file = NetworkFile(net.modules_for_file(), metadata)
    return write_lora(file, path, dtype=torch.float32)


def our_network(model, path: Path, multiplier: float = 1.0) -> LoraNetwork:
    """The file's modules as our code builds and applies them (eval mode, the given multiplier)."""
    file = read_lora(path)
    first = next(iter(file.modules.values()))
    network = network_from_file(file, path, model, config_for(first.kind, first.dora))
    for adapter in network.by_name().values():
        adapter.multiplier = multiplier
    return network.eval().to(model.device)


def outputs(model, prompts=("a cat", "a dog"), size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The text context and the UNet's prediction for fixed inputs."""
    generator = torch.Generator().manual_seed(1)
    cells = size // model.vae_scale
    latents = torch.randn(len(prompts), model.latent_channels, cells, cells, generator=generator)
    with torch.no_grad():
        cond = model.encode_prompts(list(prompts))
        return cond.context, model.predict(latents, torch.tensor([10, 700][:len(prompts)]), cond)


def fixed_draw_loss(model, latents, adapters=None) -> float:
    """Mean loss over 16 fixed (timestep, noise) draws: deterministic, so a change is the adapters' doing."""
    from finetune_core.train import objective

    generator = torch.Generator().manual_seed(1234)
    timesteps = torch.linspace(50, 950, 16).long()
    noise = torch.randn((16, *latents.shape[1:]), generator=generator)
    x0 = latents.expand(16, -1, -1, -1)
    alphas = model.alphas_cumprod()
    noisy = objective.add_noise(x0, noise, timesteps, alphas)
    target = objective.training_target(model.prediction_type, x0, noise, timesteps, alphas)
    with torch.no_grad(), model.weight_adapters(adapters or {}):
        pred = model.predict(noisy, timesteps, model.encode_prompts(["a ball"] * 16))
    return float(objective.weighted_mse(pred, target))
