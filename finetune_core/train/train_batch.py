"""The batch a method's `loss` receives: the data plus the noise, timesteps and target the loop drew."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune_core.data.data_batch import DataBatch
from finetune_core.model.interface import TextConditioning


@dataclass
class TrainBatch:
    """Everything one loss evaluation needs, on the model's device.

    target is eps or v (per the model's prediction type) for `noisy_latents` at `timesteps`.
    snr_weight: (B,) min-SNR weights when enabled, else None.
    cond: the text conditioning of `data.prompts` when the method lets the loop cache it (frozen text encoder),
          else None and the method encodes the prompts itself.
    """

    data: DataBatch
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy_latents: torch.Tensor
    target: torch.Tensor
    alphas_cumprod: torch.Tensor
    size_cond: torch.Tensor
    loss_weight: torch.Tensor | None = None
    snr_weight: torch.Tensor | None = None
    cond: TextConditioning | None = None

    @property
    def prompts(self) -> list[str]:
        return self.data.prompts
