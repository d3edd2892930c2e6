"""Stand-in for modules/sd_unet.py: `current_unet` is set while a replacement UNet (e.g. TensorRT) is active."""

from __future__ import annotations

import torch

current_unet_option = None
current_unet = None


class SdUnetOption:
    model_name = None
    label = None

    def create_unet(self):
        raise NotImplementedError()


class SdUnet(torch.nn.Module):
    def forward(self, x, timesteps, context, *args, **kwargs):
        raise NotImplementedError()

    def activate(self):
        pass

    def deactivate(self):
        pass
