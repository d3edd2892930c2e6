"""Tiny random models shaped like the WebUI's loaded `shared.sd_model` (ldm LatentDiffusion, SD1 flavour).

The attribute names, call signatures and the load order (lowvram.apply, then the hijack) follow the WebUI, so the
backend under test meets the same objects it meets there. Weights are random and small; the text encoder keeps the
real CLIP vocabulary size and width 768 so embedding files have the SD1 shape.
"""

from __future__ import annotations

import math

import torch
from modules import devices, lowvram, sd_hijack, sd_models, shared
from modules.hypernetworks import hypernetwork
from torch import nn
from torch.nn import functional as F

from finetune_core.model.tokenizer import ClipTokenizer

CHANNELS = 32


class HFLikeTokenizer:
    """The parts of transformers' CLIPTokenizer the WebUI wrapper calls."""

    def __init__(self):
        self._tok = ClipTokenizer()
        self.bos_token_id = self._tok.bos_id
        self.eos_token_id = self._tok.eos_id

    def get_vocab(self):
        return dict(self._tok._encoder)

    def __call__(self, texts, truncation=False, add_special_tokens=False, max_length=None, return_tensors=None,
                 **_):
        single = isinstance(texts, str)
        ids = [self._tok.encode(t) for t in ([texts] if single else texts)]
        if max_length is not None:
            ids = [x[:max_length] for x in ids]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(ids)}
        return {"input_ids": ids[0] if single else ids}


class FrozenCLIPEmbedder(nn.Module):
    """ldm's FrozenCLIPEmbedder: `.tokenizer`, `.transformer` (a transformers CLIPTextModel), `.layer`."""

    def __init__(self, width=768, layer="last", layer_idx=None):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                                eos_token_id=49407, pad_token_id=49407)
        self.tokenizer = HFLikeTokenizer()
        self.transformer = CLIPTextModel(config)
        # Random LayerNorm affine parameters: with the defaults the WebUI's emphasis rescaling divides by ~0.
        for module in self.transformer.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.normal_(module.weight, 1.0, 0.3)
                nn.init.normal_(module.bias, 0.2, 0.3)
        self.layer = layer
        self.layer_idx = layer_idx


class CrossAttention(nn.Module):
    """ldm CrossAttention; like the WebUI's hijacked forwards it routes the context through the hypernetworks."""

    def __init__(self, query_dim, context_dim=None):
        super().__init__()
        context_dim = context_dim or query_dim
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        context_k, context_v = hypernetwork.apply_hypernetworks(shared.loaded_hypernetworks, context, self)
        q, k, v = self.to_q(x), self.to_k(context_k), self.to_v(context_v)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.to_out(attn @ v)


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * torch.nn.functional.gelu(gate)


class FeedForward(nn.Module):
    """ldm FeedForward with gated_ff (SD's): `net` = GEGLU(proj), Dropout, Linear."""

    def __init__(self, dim, mult=2):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """ldm/sgm BasicTransformerBlock: self-attention, cross-attention, feed-forward (the WebUI checkpoints these)."""

    forward_calls = 0  # test aid: forward passes, counted across instances (gradient checkpointing repeats them)

    def __init__(self, dim, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context=None):
        BasicTransformerBlock.forward_calls += 1
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """ldm SpatialTransformer: 1x1 convolution projections (SD1) or linear ones (`use_linear`: SD2, SDXL)."""

    def __init__(self, channels, context_dim, use_linear=False):
        super().__init__()
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(8, channels)
        self.proj_in = nn.Linear(channels, channels) if use_linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, context_dim)])
        self.proj_out = nn.Linear(channels, channels) if use_linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        tokens = self.norm(x)
        if not self.use_linear:
            tokens = self.proj_in(tokens)
        tokens = tokens.flatten(2).transpose(1, 2)
        if self.use_linear:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context=context)
        if self.use_linear:
            tokens = self.proj_out(tokens)
        tokens = tokens.transpose(1, 2).reshape(b, c, h, w)
        if not self.use_linear:
            tokens = self.proj_out(tokens)
        return x + tokens


class ResBlock(nn.Module):
    def __init__(self, in_ch, out_ch, emb_ch):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(8, in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        self.out_layers = nn.Sequential(nn.GroupNorm(8, out_ch), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# The real models' layouts, shrunk in width (as the built-in tiny diffusers models): SD1/SD2 have four levels with
# attention on the first three; SDXL three levels with attention on the last two.
LAYOUTS = {"sd1": ((1, 1, 2, 2), (0, 1, 2), False), "sd2": ((1, 1, 2, 2), (0, 1, 2), True),
           "sdxl": ((1, 2, 2), (1, 2), True)}


class UNetModel(nn.Module):
    """ldm/sgm UNetModel on the real LDM layout (two resnets per level down, three up, attention and samplers
    where the real model has them), so module paths are the real ones: time_embed, input_blocks, middle_block,
    output_blocks, out (the lowvram hooks move these)."""

    def __init__(self, context_dim, adm_in_channels=None, layout="sd1"):
        super().__init__()
        mults, attention, linear = LAYOUTS[layout]
        ch, emb = CHANNELS, CHANNELS * 2
        self.model_channels = ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, emb), nn.SiLU(),
                                                     nn.Linear(emb, emb))) if adm_in_channels else None

        def block(*layers):
            return TimestepEmbedSequential(*layers)

        self.input_blocks = nn.ModuleList([block(nn.Conv2d(4, ch, 3, padding=1))])
        skips, current = [ch], ch
        for level, mult in enumerate(mults):
            for _ in range(2):
                layers = [ResBlock(current, ch * mult, emb)]
                current = ch * mult
                if level in attention:
                    layers.append(SpatialTransformer(current, context_dim, linear))
                self.input_blocks.append(block(*layers))
                skips.append(current)
            if level != len(mults) - 1:
                self.input_blocks.append(block(Downsample(current)))
                skips.append(current)
        self.middle_block = block(ResBlock(current, current, emb), SpatialTransformer(current, context_dim, linear),
                                  ResBlock(current, current, emb))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for index in range(3):
                layers = [ResBlock(current + skips.pop(), ch * mult, emb)]
                current = ch * mult
                if level in attention:
                    layers.append(SpatialTransformer(current, context_dim, linear))
                if level and index == 2:
                    layers.append(Upsample(current))
                self.output_blocks.append(block(*layers))
        self.out = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, 4, 3, padding=1))

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            skip = hs.pop()
            if h.shape[-2:] != skip.shape[-2:]:  # the WebUI's sd_hijack_unet: sizes not a multiple of 64 px
                h = torch.nn.functional.interpolate(h, skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h)


class DiffusionWrapper(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet
        self.conditioning_key = "crossattn"

    def forward(self, x, t, c_concat=None, c_crossattn=None, c_adm=None):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class DiagonalGaussianDistribution:
    def __init__(self, parameters):
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self):
        return self.mean + self.std * torch.randn_like(self.mean)

    def mode(self):
        return self.mean


class ResnetBlock(nn.Module):
    """ldm `diffusionmodules.model.ResnetBlock`, shrunk: the decoder's block (called with temb=None)."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, temb):
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class Decoder(nn.Module):
    """ldm's VAE decoder, shrunk to one mid block and the upsampling to pixels."""

    def __init__(self):
        super().__init__()
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(4)
        self.conv_out = nn.ConvTranspose2d(4, 3, 8, stride=8)

    def forward(self, z):
        return self.conv_out(self.mid.block_1(z, None))


class AutoencoderKL(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(3, 8, 8, stride=8)
        self.quant_conv = nn.Conv2d(8, 8, 1)
        self.post_quant_conv = nn.Conv2d(4, 4, 1)
        self.decoder = Decoder()

    def encode(self, x):
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return torch.tanh(self.decoder(self.post_quant_conv(z)))

    def forward(self, x):
        return self.decode(self.encode(x).sample())


def linear_alphas_cumprod():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


class LatentDiffusion(nn.Module):
    """ldm.models.diffusion.ddpm.LatentDiffusion as the WebUI holds it (SD1)."""

    def __init__(self, cond_stage_model=None, context_dim=768, parameterization="eps", layout="sd1"):
        super().__init__()
        self.model = DiffusionWrapper(UNetModel(context_dim=context_dim, layout=layout))
        self.first_stage_model = AutoencoderKL()
        self.cond_stage_model = cond_stage_model if cond_stage_model is not None else FrozenCLIPEmbedder()
        self.scale_factor = 0.18215
        self.parameterization = parameterization
        self.num_timesteps = 1000
        self.register_buffer("alphas_cumprod", linear_alphas_cumprod())
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_ssd, self.is_sd3 = True, False, False, False, False
        self.latent_channels = 4
        self.lowvram = False
        info = sd_models.CheckpointInfo(sd_models.model_path() + "/tiny-sd1.safetensors", "abcdef0123")
        self.sd_checkpoint_info = info
        self.sd_model_hash = info.shorthash
        self.sd_model_checkpoint = info.filename

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior):
        return self.scale_factor * encoder_posterior.sample()

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)

    def get_learned_conditioning(self, c):
        return self.cond_stage_model(c)

    def apply_model(self, x_noisy, t, cond):
        cond = cond if isinstance(cond, dict) else {"c_crossattn": [cond]}
        return self.model(x_noisy.to(devices.dtype_unet), t, **cond)


def build_sd1(seed=0):
    """Build, lowvram-apply (per cmd_opts), hijack and install a tiny SD1 model as `shared.sd_model`."""
    torch.manual_seed(seed)
    return install(LatentDiffusion())


def freeze_like_ldm(model):
    """What ldm/sgm freeze when they build a model: the VAE and the non-trainable text encoders. The UNet keeps
    requires_grad=True, as in the WebUI (nothing there freezes it)."""
    model.first_stage_model.requires_grad_(False)
    if hasattr(model, "conditioner"):
        for embedder in model.conditioner.embedders:
            if not getattr(embedder, "is_trainable", False):
                embedder.requires_grad_(False)
    else:
        model.cond_stage_model.requires_grad_(False)


def install(model):
    """Load `model` the way the WebUI does: lowvram.apply (per cmd_opts), hijack, `shared.sd_model`, embeddings."""
    model = model.eval()
    freeze_like_ldm(model)
    if not shared.cmd_opts.no_half:  # as sd_models.load_model_weights: everything half, the VAE in dtype_vae
        model.half()
        model.first_stage_model.to(devices.dtype_vae)
        devices.dtype_unet = torch.float16
    lowvram.apply(model)
    if not model.lowvram:
        model.to(devices.device)
    hijack = sd_hijack.model_hijack or sd_hijack.new_model_hijack()
    hijack.hijack(model)
    import networks  # the built-in Lora extension names the layers in its on_model_loaded callback

    networks.assign_network_names_to_compvis_modules(model)
    shared.sd_model = model
    sd_models.model_data.sd_model = model
    hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    hijack.embedding_db.load_calls.clear()
    return model
