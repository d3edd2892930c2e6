"""Helpers for the LoRA tests: a LoRA file with random (non-zero) up and down weights for a model, and applying a
file with our own code."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune_core.formats.lora_file import LoraFile, base_version, read_lora, write_lora
from finetune_core.methods.lora import LoraConfig
from finetune_core.methods.lora_net import LoraNetwork
from finetune_core.methods.lora_setup import network_from_file, new_network
from finetune_core.model.interface import V_PREDICTION


def random_lora_file(model, path: Path, conv: bool = True, seed: int = 5) -> Path:
    """Every adaptable layer (UNet transformer, resnet and sampler layers, text encoders) at rank 2 / conv rank 3,
    alpha 3, with random up weights so that every adapter changes its layer; written in float32."""
    config = LoraConfig(rank=2, alpha=3.0, conv_rank=3 if conv else 0, conv_alpha=1.5, train_text_encoder=True)
    network = new_network(model.adapter_targets(), config, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in network.by_name().values():
            adapter.up.copy_(0.2 * torch.randn(adapter.up.shape, generator=generator))
    version = base_version(model.family, model.prediction_type == V_PREDICTION)
    metadata = {"ss_base_model_version": version, "ss_v2": str(model.family == "sd2"), "ss_output_name": path.stem}
    file = LoraFile(network.modules_for_file(), metadata)
    return write_lora(file, path, dtype=torch.float32)


def our_network(model, path: Path, multiplier: float = 1.0) -> LoraNetwork:
    """The file's adapters as our code builds and applies them (eval mode, the given multiplier)."""
    network = network_from_file(read_lora(path), path, model, LoraConfig(train_text_encoder=True))
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
