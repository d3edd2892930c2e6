"""The standalone `DiffusionModel`: diffusers UNet and VAE, transformers CLIP text encoders, our CLIP tokenizer."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from finetune_core.errors import FinetuneError, ModelMismatchError
from finetune_core.formats.checkpoint import diffusers_to_ldm
from finetune_core.formats.lora_keys import text_prefixes
from finetune_core.model import chunks as chunking
from finetune_core.model.adapters import (
    AdapterStack,
    Layers,
    check_with_reader,
    hf_text_layers,
    layer_weight,
    unet_layers,
)
from finetune_core.model.attention import ContextTransformProcessor
from finetune_core.model.interface import (
    SD1,
    SDXL,
    AdapterTarget,
    ChunkHook,
    ContextTransform,
    EncodedText,
    LatentMoments,
    ModelIdentity,
    NetworkCheck,
    SampleRequest,
    TextConditioning,
    TextEncoderSpec,
    TrainableEmbedding,
    TrainingSession,
    TrainingSetup,
    WeightAdapter,
)
from finetune_core.model.noise_schedule import scaled_linear_alphas_cumprod
from finetune_core.model.sampler import SAMPLERS, sample
from finetune_core.model.session import WeightState, autocast_factory, compute_dtype, select_trained
from finetune_core.model.text_chunks import ChunkRows, pooled_at_eos, tensor_digest
from finetune_core.model.tokenizer import ClipTokenizer

logger = logging.getLogger(__name__)

Fixes = list[list[tuple[int, str]]]  # per encoded row: (position in the 77 ids, embedding name)


class DiffusersModel:
    """SD1 / SD2 / SDXL over diffusers components; frozen until a method unfreezes `trainable_modules()`."""

    latent_channels: int
    vae_scale = 8

    def __init__(self, unet: Any, vae: Any, text_encoder: Any, text_encoder_2: Any = None, *, family: str,
                 prediction_type: str, identity: ModelIdentity, tokenizer: ClipTokenizer | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 vae_dtype: torch.dtype | None = None) -> None:
        if (family == SDXL) != (text_encoder_2 is not None):
            raise ModelMismatchError(f"An {family} model needs {'two text encoders' if family == SDXL else 'one'}.")
        self.family, self.prediction_type, self.identity = family, prediction_type, identity
        self._device, self._dtype = torch.device(device), dtype
        self.unet = unet.to(self._device, dtype).eval().requires_grad_(False)
        self.vae = vae.to(self._device, vae_dtype or dtype).eval().requires_grad_(False)
        encoders = [e for e in (text_encoder, text_encoder_2) if e is not None]
        self._encoders = [e.to(self._device, dtype).eval().requires_grad_(False) for e in encoders]
        keys = ("clip_l", "clip_g")
        self.text_encoders = tuple(TextEncoderSpec(keys[i], e.config.hidden_size) for i, e in enumerate(encoders))
        self.latent_channels = int(vae.config.latent_channels)
        self.tokenizer = tokenizer or ClipTokenizer()
        self._comma_id = self.tokenizer.encode(",")[0]
        # Embeddings the prompts of this model may name without passing them (loaded ones); the caller fills it.
        self.known_embeddings: dict[str, TrainableEmbedding] = {}
        self._chunk_hook: ChunkHook | None = None
        self._adapters = AdapterStack()
        self._adapter_layer_map: Layers | None = None

    # --- properties -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def context_width(self) -> int:
        return sum(t.width for t in self.text_encoders)

    def alphas_cumprod(self) -> torch.Tensor:
        """SD's scaled-linear training schedule (all three families train on it)."""
        return scaled_linear_alphas_cumprod()

    # --- text -------------------------------------------------------------------------------------------------
    def _pad_ids(self) -> list[int]:
        """Pad id per encoder: CLIP-L pads with EOS; OpenCLIP (SD2, SDXL's second encoder) pads with 0."""
        first = self.tokenizer.eos_id if self.family in (SD1, SDXL) else 0
        return [first, 0][:len(self._encoders)]

    def _chunks(self, text: str, embeddings: Mapping[str, TrainableEmbedding]) -> list[chunking.Chunk]:
        names = {name: (self.tokenizer.encode(name), emb.n_vectors) for name, emb in embeddings.items()}
        return chunking.split_chunks(self.tokenizer.encode(text), names, self._comma_id)

    def count_tokens(self, text: str) -> int:
        return chunking.count_tokens(self._chunks(text, self.known_embeddings))

    def token_vectors(self, text: str) -> dict[str, torch.Tensor]:
        ids = torch.tensor(self.tokenizer.encode(text), dtype=torch.long, device=self._device)
        with torch.no_grad():
            return {spec.key: enc.get_input_embeddings()(ids).float().cpu()
                    for spec, enc in zip(self.text_encoders, self._encoders)}

    def encode_prompts(self, prompts: list[str],
                       embeddings: Mapping[str, TrainableEmbedding] | None = None) -> TextConditioning:
        if not prompts:
            raise FinetuneError("encode_prompts got no prompts; give at least one (an empty string is fine).")
        known = {**self.known_embeddings, **(embeddings or {})}
        self._check_embeddings(known)
        per_prompt = [self._chunks(p, known) for p in prompts]
        k = max(len(c) for c in per_prompt)
        rows = [c[i] if i < len(c) else chunking.Chunk() for c in per_prompt for i in range(k)]
        fixes = [[(offset + 1, name) for offset, name in row.fixes] for row in rows]  # +1: after BOS
        contexts, pooled = [], None
        for index, pad in enumerate(self._pad_ids()):
            ids = torch.tensor([chunking.chunk_ids(r, self.tokenizer.bos_id, self.tokenizer.eos_id, pad)
                                for r in rows], device=self._device)
            hidden, text_embeds = self._run_encoder(index, ids, fixes, known)
            contexts.append(hidden)
            if index == 1:
                pooled = text_embeds.reshape(len(prompts), k, -1)[:, 0]  # the first chunk's, as the WebUI does
        context = torch.cat(contexts, dim=-1).reshape(len(prompts), k * 77, self.context_width)
        return TextConditioning(context, pooled)

    def _check_embeddings(self, embeddings: Mapping[str, TrainableEmbedding]) -> None:
        for name, emb in embeddings.items():
            for spec in self.text_encoders:
                vec = emb.vectors.get(spec.key)
                if vec is None or vec.ndim != 2 or vec.shape[1] != spec.width:
                    have = {k: tuple(v.shape) for k, v in emb.vectors.items()}
                    raise ModelMismatchError(f"The embedding {name!r} has vectors {have}, but this {self.family} "
                                             f"model needs {spec.key!r} vectors of width {spec.width}: use an "
                                             f"embedding made for this model family.")
            if emb.n_vectors > chunking.CHUNK_LENGTH:
                raise FinetuneError(f"The embedding {name!r} has {emb.n_vectors} vectors; at most 75 fit a prompt.")

    def _run_encoder(self, index: int, ids: torch.Tensor, fixes: Fixes,
                     embeddings: Mapping[str, TrainableEmbedding]) -> tuple[torch.Tensor, Any]:
        """Encode id rows with the embeddings' vectors spliced in; the chunk hook, if any, sees the result."""
        encoded, text_embeds = self._encode_ids(index, ids, fixes, embeddings)
        hidden = encoded.hidden
        if self._chunk_hook is not None:
            hidden = self._chunk_hook(self._chunk_rows(index, ids, hidden, fixes, embeddings))
        return hidden, text_embeds

    def _encode_ids(self, index: int, ids: torch.Tensor, fixes: Fixes,
                    embeddings: Mapping[str, TrainableEmbedding]) -> tuple[EncodedText, Any]:
        """The encoder's conditioning hidden states and pooled output for id rows, embeddings spliced in
        differentiably; also the projected text embeds of an encoder that has a projection (SDXL's second)."""
        encoder, key = self._encoders[index], self.text_encoders[index].key

        def splice(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            out = []
            for row, row_fixes in zip(output, fixes):
                for offset, name in row_fixes:
                    vec = embeddings[name].vectors[key].to(row.device, row.dtype)
                    row = torch.cat([row[:offset], vec, row[offset + vec.shape[0]:]])
                out.append(row)
            return torch.stack(out)

        handle = encoder.get_input_embeddings().register_forward_hook(splice)
        try:
            # SDXL reads the penultimate layer without the final LayerNorm; SD1 and SD2 (whose diffusers encoder
            # already ends at the real model's penultimate layer) read the last layer with it.
            out = encoder(input_ids=ids, output_hidden_states=self.family == SDXL)
        finally:
            handle.remove()
        hidden = out.hidden_states[-2] if self.family == SDXL else out.last_hidden_state
        pooled = pooled_at_eos(out.last_hidden_state, ids, self.tokenizer.eos_id)
        return EncodedText(hidden, pooled), getattr(out, "text_embeds", None)

    def _chunk_rows(self, index: int, ids: torch.Tensor, hidden: torch.Tensor, fixes: Fixes,
                    embeddings: Mapping[str, TrainableEmbedding]) -> ChunkRows:
        """These rows as `TextChunks` for the chunk hook."""
        key, pad = self.text_encoders[index].key, self._pad_ids()[index]

        def run(rows: torch.Tensor, splice: list[int] | None) -> EncodedText:
            chosen = [fixes[i] for i in splice] if splice is not None else [[] for _ in rows]
            return self._encode_ids(index, rows, chosen, embeddings)[0]

        def tokenize(text: str) -> list[int]:
            chunk = chunking.Chunk(self.tokenizer.encode(text)[:chunking.CHUNK_LENGTH])
            return chunking.chunk_ids(chunk, self.tokenizer.bos_id, self.tokenizer.eos_id, pad)

        extras = [";".join(f"{offset}:{name}:{tensor_digest(embeddings[name].vectors[key])}"
                           for offset, name in row) for row in fixes]
        state = f"{self.family}|{self.identity.name}|{self.identity.shorthash}|{key}|{self._dtype}"
        return ChunkRows(key, ids, hidden, self._encoders[index], run, tokenize, state, extras)

    # --- images -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> LatentMoments:
        dist = self.vae.encode(pixels.to(self._device, self.vae.dtype)).latent_dist
        scale = float(self.vae.config.scaling_factor)
        return LatentMoments(dist.mean.float() * scale, dist.std.float() * scale)

    def decode_latents(self, latents: torch.Tensor, grad: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            scaled = latents.to(self._device, self.vae.dtype) / float(self.vae.config.scaling_factor)
            return self.vae.decode(scaled).sample.float().clamp(-1, 1)

    # --- denoiser ---------------------------------------------------------------------------------------------
    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning,
                size_cond: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet output in float32 (eps or v per `prediction_type`)."""
        x = noisy_latents.to(self._device, self._dtype)
        added = None
        if self.family == SDXL:
            if cond.pooled is None:
                raise ModelMismatchError("SDXL needs pooled text conditioning; encode prompts with this model.")
            if size_cond is None:
                h, w = x.shape[-2] * self.vae_scale, x.shape[-1] * self.vae_scale
                size_cond = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(x.shape[0], 6)
            added = {"text_embeds": cond.pooled.to(self._device, self._dtype),
                     "time_ids": size_cond.to(self._device, self._dtype)}
        out = self.unet(x, timesteps.to(self._device), encoder_hidden_states=cond.context.to(self._device, self._dtype),
                        added_cond_kwargs=added).sample
        return out.float()

    def context_transform(self, transform: ContextTransform | None) -> AbstractContextManager[None]:
        if transform is None:
            return nullcontext()
        return self._transformed_attention(transform)

    @contextmanager
    def _transformed_attention(self, transform: ContextTransform) -> Iterator[None]:
        original = self.unet.attn_processors
        self.unet.set_attn_processor(ContextTransformProcessor(transform))
        try:
            yield
        finally:
            self.unet.set_attn_processor(original)

    def attention_context_widths(self) -> dict[str, set[int]]:
        from diffusers.models.attention_processor import Attention

        widths: dict[str, set[int]] = {"cross": set(), "self": set()}
        for module in self.unet.modules():
            if isinstance(module, Attention):
                widths["cross" if module.is_cross_attention else "self"].add(module.to_k.in_features)
        return widths

    @contextmanager
    def text_chunk_hook(self, hook: ChunkHook) -> Iterator[None]:
        if self._chunk_hook is not None:
            raise FinetuneError("another text-encoder hook is active on this model; only one can be")
        self._chunk_hook = hook
        try:
            yield
        finally:
            self._chunk_hook = None

    # --- weights and jobs -------------------------------------------------------------------------------------
    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        modules = {"unet": self.unet, "text_encoder": self._encoders[0]}
        if len(self._encoders) > 1:
            modules["text_encoder_2"] = self._encoders[1]
        return modules

    @contextmanager
    def training_session(self, setup: TrainingSetup) -> Iterator[TrainingSession]:
        trained = select_trained(self.trainable_modules(), setup.train, self.family)
        compute = compute_dtype(setup.precision, self._dtype)
        factory = autocast_factory(self._device, compute)
        with ExitStack() as stack:
            weights = WeightState([self.unet, self.vae, *self._encoders], trained)
            stack.callback(weights.restore)
            if setup.gradient_checkpointing:
                stack.enter_context(_checkpointing(self.unet, trained))
            if setup.vae_gradient_checkpointing:
                stack.enter_context(_switched_on(self.vae))
            yield TrainingSession(trained, compute, factory)

    def adapter_targets(self) -> dict[str, AdapterTarget]:
        return {name: target for name, (target, _) in self._adapter_layers().items()}

    def adapter_weight(self, name: str) -> torch.Tensor:
        return layer_weight(self._adapter_layers(), name)

    def check_network_file(self, path: Path) -> NetworkCheck:
        return check_with_reader(self._adapter_layers(), path)

    def weight_adapters(self, adapters: Mapping[str, WeightAdapter]) -> AbstractContextManager[None]:
        return self._adapters.applied(self._adapter_layers(), adapters)

    def _adapter_layers(self) -> Layers:
        """diffusers module paths for the UNet, transformers ones for the text encoders (built once)."""
        if self._adapter_layer_map is None:
            layers = unet_layers(self.unet, self.family, "diffusers")
            modules = self.trainable_modules()
            for key, prefix in text_prefixes(self.family).items():
                layers.update(hf_text_layers(modules[key], key, prefix))
            self._adapter_layer_map = layers
        return self._adapter_layer_map

    def placement(self) -> AbstractContextManager[None]:
        return nullcontext()

    def sample(self, request: SampleRequest, embeddings: Mapping[str, TrainableEmbedding] | None = None,
               context_transform: ContextTransform | None = None,
               adapters: Mapping[str, WeightAdapter] | None = None) -> list[Any]:
        with nullcontext() if adapters is None else self.weight_adapters(adapters):
            return sample(self, request, embeddings, context_transform)

    def sampler_names(self) -> list[str]:
        return list(SAMPLERS)

    def ldm_state_dict(self, modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Through the diffusers -> LDM key mapping (`formats.checkpoint`); SD2's text encoder lacks the last
        layer diffusers drops (the caller carries it over from the source checkpoint)."""
        available = {**self.trainable_modules(), "vae": self.vae}
        missing = [name for name in modules if name not in available]
        if missing:
            raise ModelMismatchError(f"this {self.family} model has no {', '.join(missing)}")
        components = {name: {k: v.detach().to("cpu") for k, v in available[name].state_dict().items()}
                      for name in modules}
        return diffusers_to_ldm(components, self.family)


@contextmanager
def _switched_on(model: Any) -> Iterator[None]:
    """A diffusers model's own gradient checkpointing (the VAE: its decoder's mid and up blocks), then back off."""
    was_on = bool(getattr(model, "is_gradient_checkpointing", False))
    model.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if not was_on:
            model.disable_gradient_checkpointing()


@contextmanager
def _checkpointing(unet: Any, trained: Mapping[str, torch.nn.Module]) -> Iterator[None]:
    """diffusers' and transformers' own gradient checkpointing, switched back off afterwards. Trained text encoders
    run in train mode meanwhile: transformers checkpoints CLIP only then (CLIP has no dropout to change)."""
    was_on = bool(getattr(unet, "is_gradient_checkpointing", False))
    unet.enable_gradient_checkpointing()
    encoders: list[Any] = [m for name, m in trained.items() if name.startswith("text_encoder")]
    for encoder in encoders:
        # Non-reentrant, as the UNet's: reentrant checkpointing warns (and keeps no graph) when a no-grad pass of
        # the job (class images, previews) runs through the encoder.
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        encoder.train()
    try:
        yield
    finally:
        for encoder in encoders:
            encoder.gradient_checkpointing_disable()
            encoder.eval()
        if not was_on:
            unet.disable_gradient_checkpointing()
