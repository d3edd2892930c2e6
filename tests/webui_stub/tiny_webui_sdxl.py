"""Tiny random SD2 (ldm LatentDiffusion, v-prediction, OpenCLIP-H text) and SDXL (sgm DiffusionEngine) models
shaped like the WebUI's loaded `shared.sd_model` (webui-integration.md §4).

SDXL follows sgm plus A1111's `sd_models_xl` patches: `conditioner` is a `GeneralConditioner` (CLIP-L, OpenCLIP-bigG,
three Fourier size/crop embedders; non-trainable embedders run under no_grad, as in sgm) with the WebUI's added
`tokenize` / `process_texts` / `encode_embedding_init_text`; `get_learned_conditioning(batch)` builds the sdxl_conds
dict; `apply_model` calls `model(x, t, cond)`; `encode_first_stage` returns `scale_factor * sample`.
"""

from __future__ import annotations

from contextlib import nullcontext

import tiny_webui_model as sd1
import torch
from modules import devices, sd_models, shared
from tiny_webui_openclip import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, FrozenOpenCLIPEmbedder2
from torch import nn

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


def build_sd2(seed=0):
    """A tiny SD2-v model (OpenCLIP width 1024, penultimate layer, parameterization "v"), loaded as the WebUI does."""
    torch.manual_seed(seed)
    model = sd1.LatentDiffusion(FrozenOpenCLIPEmbedder(), context_dim=1024, parameterization="v", layout="sd2")
    model.is_sd1, model.is_sd2 = False, True
    info = sd_models.CheckpointInfo(sd_models.model_path() + "/tiny-sd2.safetensors", "bcdef01234")
    model.sd_checkpoint_info, model.sd_model_hash, model.sd_model_checkpoint = info, info.shorthash, info.filename
    return sd1.install(model)


def build_sdxl(seed=0):
    """A tiny SDXL base model (CLIP-L 768 + OpenCLIP-bigG 1280, adm_in_channels 2816), loaded as the WebUI does."""
    torch.manual_seed(seed)
    return sd1.install(DiffusionEngine())


class Timestep(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        return sd1.timestep_embedding(t, self.dim)


class ConcatTimestepEmbedderND(nn.Module):
    """sgm: each number of the (B, d) input becomes a 256-wide Fourier embedding, concatenated to (B, d * 256)."""

    is_trainable = False
    ucg_rate = 0.0
    legacy_ucg_val = None

    def __init__(self, outdim=256, input_key=None):
        super().__init__()
        self.timestep = Timestep(outdim)
        self.outdim = outdim
        self.input_key = input_key

    def forward(self, x):
        if x.ndim == 1:
            x = x[:, None]
        b, dims = x.shape
        emb = self.timestep(x.reshape(b * dims))
        return emb.reshape(b, dims * self.outdim)


class GeneralConditioner(nn.Module):
    """sgm.modules.GeneralConditioner with the methods A1111's sd_models_xl adds to it."""

    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, embedders):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)

    def forward(self, batch, force_zero_embeddings=None):
        output = {}
        force_zero_embeddings = force_zero_embeddings or []
        for embedder in self.embedders:
            # As in sgm: an embedder that is not `is_trainable` runs without autograd.
            context = nullcontext() if embedder.is_trainable else torch.no_grad()
            with context:
                emb_out = embedder(batch[embedder.input_key])
            if not isinstance(emb_out, (list, tuple)):
                emb_out = [emb_out]
            for emb in emb_out:
                key = self.OUTPUT_DIM2KEYS[emb.dim()]
                if embedder.input_key in force_zero_embeddings:
                    emb = torch.zeros_like(emb)
                output[key] = torch.cat((output[key], emb), self.KEY2CATDIM[key]) if key in output else emb
        return output

    def _text(self):
        return [e for e in self.embedders if hasattr(e, "encode_embedding_init_text")]

    def tokenize(self, texts):
        return self._text()[0].tokenize(texts)

    def process_texts(self, texts):
        return self._text()[0].process_texts(texts)

    def get_target_prompt_token_count(self, token_count):
        return self._text()[0].get_target_prompt_token_count(token_count)

    def encode_embedding_init_text(self, init_text, nvpt):
        return torch.cat([e.encode_embedding_init_text(init_text, nvpt) for e in self._text()], dim=1)


class OpenAIWrapper(nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = "crossattn"  # set by sd_models_xl.extend_sdxl

    def forward(self, x, t, c, **kwargs):
        x = torch.cat((x, c.get("concat", torch.Tensor([]).type_as(x))), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"), **kwargs)


class AutoencoderKLInferenceWrapper(sd1.AutoencoderKL):
    """sgm's inference VAE: `encode` returns a sample, not a distribution."""

    def encode(self, x):
        return super().encode(x).sample()


class DiffusionEngine(nn.Module):
    """sgm.models.diffusion.DiffusionEngine as the WebUI holds it (SDXL base)."""

    def __init__(self):
        super().__init__()
        self.model = OpenAIWrapper(sd1.UNetModel(context_dim=2048, adm_in_channels=2816, layout="sdxl"))
        self.first_stage_model = AutoencoderKLInferenceWrapper()
        self.conditioner = GeneralConditioner([FrozenCLIPEmbedder(), FrozenOpenCLIPEmbedder2()] +
                                              [ConcatTimestepEmbedderND(256, key) for key in SIZE_KEYS])
        self.scale_factor = 0.13025
        self.parameterization = "eps"
        self.cond_stage_key = "txt"
        self.register_buffer("alphas_cumprod", sd1.linear_alphas_cumprod())
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_ssd, self.is_sd3 = False, False, True, False, False
        self.latent_channels = 4
        self.lowvram = False
        info = sd_models.CheckpointInfo(sd_models.model_path() + "/tiny-sdxl.safetensors", "cdef012345")
        self.sd_checkpoint_info, self.sd_model_hash, self.sd_model_checkpoint = info, info.shorthash, info.filename

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.scale_factor * self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, x):  # A1111 makes it the identity for sgm
        return x

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)

    def get_learned_conditioning(self, batch):
        """A1111's sd_models_xl.get_learned_conditioning."""
        for embedder in self.conditioner.embedders:
            embedder.ucg_rate = 0.0
        width = getattr(batch, "width", 1024) or 1024
        height = getattr(batch, "height", 1024) or 1024
        is_negative = getattr(batch, "is_negative_prompt", False)
        args = {"device": devices.device, "dtype": devices.dtype}
        crop = [shared.opts.sdxl_crop_top, shared.opts.sdxl_crop_left]
        conds = {"txt": batch,
                 "original_size_as_tuple": torch.tensor([height, width], **args).repeat(len(batch), 1),
                 "crop_coords_top_left": torch.tensor(crop, **args).repeat(len(batch), 1),
                 "target_size_as_tuple": torch.tensor([height, width], **args).repeat(len(batch), 1)}
        force_zero = is_negative and all(x == "" for x in batch)
        return self.conditioner(conds, force_zero_embeddings=["txt"] if force_zero else [])

    def apply_model(self, x, t, cond):
        return self.model(x, t, cond)
