"""The WebUI `DiffusionModel`: wraps the loaded `shared.sd_model` (ldm LatentDiffusion for SD1/SD2, sgm
DiffusionEngine for SDXL) without changing it.

Prompts go through the WebUI's own hijacked text-encoder wrappers, so 75-token chunks, emphasis and clip skip are
exactly as in generation; trainable embeddings are spliced in by registering stand-ins in the WebUI's embedding
database for the duration of one call. Hypernetwork-style context transforms ride on `shared.loaded_hypernetworks`.
Only this module (and placement.py's callers) import the WebUI's `modules`, lazily.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from finetune_core.errors import FinetuneError, ModelMismatchError
from finetune_core.formats.lora_keys import text_prefixes
from finetune_core.model import webui_session as ws
from finetune_core.model.adapters import (
    AdapterStack,
    Layers,
    check_with_reader,
    hf_text_layers,
    layer_weight,
    openclip_text_layers,
    unet_layers,
)
from finetune_core.model.interface import (
    EPSILON,
    SD1,
    SD2,
    SDXL,
    V_PREDICTION,
    AdapterTarget,
    ChunkHook,
    ContextTransform,
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
from finetune_core.model.placement import Residency
from finetune_core.model.session import WeightState, autocast_factory, compute_dtype, select_trained
from finetune_core.model.webui_sampler import sampler_names, txt2img
from finetune_core.model.webui_text_hook import chunk_hooked

logger = logging.getLogger(__name__)

_SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


def detect_family(sd_model: Any) -> str:
    """SD1 / SD2 / SDXL from the flags `sd_models.set_model_type` sets; the SDXL refiner is refused."""
    if getattr(sd_model, "is_sdxl", False) or hasattr(sd_model, "conditioner"):
        embedders = getattr(getattr(sd_model, "conditioner", None), "embedders", [])
        text_embedders = [e for e in embedders if hasattr(e, "tokenize") or hasattr(e, "encode_embedding_init_text")]
        if embedders and len(text_embedders) == 1:
            raise ModelMismatchError("The loaded model is an SDXL refiner (one text encoder); train on an SDXL base "
                                     "model instead, then use the result with the refiner as usual.")
        return SDXL
    return SD2 if getattr(sd_model, "is_sd2", False) else SD1


class WebUIModel:
    """SD1 / SD2 / SDXL over the WebUI's loaded model; see the module docstring."""

    latent_channels: int
    vae_scale = 8

    def __init__(self, sd_model: Any) -> None:
        from modules import devices, lowvram

        if sd_model is None:
            raise FinetuneError("No Stable Diffusion model is loaded in the WebUI: pick a checkpoint at the top of "
                                "the page, wait for it to load, then start training again.")
        if getattr(sd_model, "is_sd3", False) or not hasattr(sd_model, "first_stage_model"):
            raise ModelMismatchError("The loaded model is not SD1, SD2 or SDXL (for example SD3): load one of those.")
        self.sd_model = sd_model
        self._devices = devices
        self.family = detect_family(sd_model)
        self.prediction_type = V_PREDICTION if getattr(sd_model, "parameterization", "eps") == "v" else EPSILON
        self.identity = _identity(sd_model)
        self.latent_channels = int(getattr(sd_model, "latent_channels", 4))
        self.text_encoders = self._text_specs()
        self._residency = Residency(sd_model, {"unet": sd_model.model, "text": self._hooked_text_module(),
                                               "vae": sd_model.first_stage_model}, lowvram, devices)
        self._adapters = AdapterStack()
        self._adapter_layer_map: Layers | None = None

    # --- properties -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device(self._devices.device)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.sd_model.model.diffusion_model.parameters()).dtype

    @property
    def context_width(self) -> int:
        return sum(t.width for t in self.text_encoders)

    def alphas_cumprod(self) -> torch.Tensor:
        # ldm keeps the unmodified schedule aside when an option (downcast / zero terminal SNR) replaces it.
        schedule = getattr(self.sd_model, "alphas_cumprod_original", None)
        if schedule is None:
            schedule = self.sd_model.alphas_cumprod
        return schedule.detach().to("cpu", torch.float32).clone()

    # --- text -------------------------------------------------------------------------------------------------
    def _wrappers(self) -> list[Any]:
        """The hijacked text wrappers, one per text encoder (SDXL: the conditioner's CLIP-L and OpenCLIP-G)."""
        if self.family == SDXL:
            return [e for e in self.sd_model.conditioner.embedders if hasattr(e, "encode_embedding_init_text")]
        return [self.sd_model.cond_stage_model]

    def _hooked_text_module(self) -> torch.nn.Module:
        """The module the lowvram hook moves for the text encoders (§8: `.wrapped` for SD1/SD2, the conditioner)."""
        if self.family == SDXL:
            return self.sd_model.conditioner
        return getattr(self.sd_model.cond_stage_model, "wrapped", self.sd_model.cond_stage_model)

    def _text_specs(self) -> tuple[TextEncoderSpec, ...]:
        if self.family == SDXL:
            return TextEncoderSpec("clip_l", 768), TextEncoderSpec("clip_g", 1280)
        return (TextEncoderSpec("clip_l", 1024 if self.family == SD2 else 768),)

    def count_tokens(self, text: str) -> int:
        return int(self._wrappers()[0].process_texts([text])[1])

    def token_vectors(self, text: str) -> dict[str, torch.Tensor]:
        out = {}
        with torch.no_grad(), self._residency:
            self._residency.need("text")
            for spec, wrapper in zip(self.text_encoders, self._wrappers()):
                n = max(1, len(wrapper.tokenize([text])[0]))
                out[spec.key] = wrapper.encode_embedding_init_text(text, n).detach().to("cpu", torch.float32)
        return out

    def encode_prompts(self, prompts: list[str],
                       embeddings: Mapping[str, TrainableEmbedding] | None = None) -> TextConditioning:
        """Through the WebUI's wrappers (chunks, emphasis, clip skip), with `embeddings` spliced in differentiably.
        Under --medvram/--lowvram an encode without gradients (the text cache's) sends the encoder back to the CPU
        afterwards: steps on cached text then hold no text encoder on the device (1.5 GiB for SDXL's two)."""
        self._residency.need("text")
        try:
            with self._spliced(embeddings or {}), self._devices.autocast():
                if self.family == SDXL:
                    with _trainable(self._wrappers()):
                        out = self.sd_model.get_learned_conditioning(list(prompts))
                    return TextConditioning(out["crossattn"].float(), out["vector"][:, :1280].float())
                return TextConditioning(self.sd_model.cond_stage_model(list(prompts)).float())
        finally:
            if not torch.is_grad_enabled():
                self._residency.release("text")

    @contextmanager
    def _spliced(self, embeddings: Mapping[str, TrainableEmbedding]) -> Iterator[None]:
        """Register stand-ins for `embeddings` in the WebUI's embedding database; put back what was there."""
        if not embeddings:
            yield
            return
        from modules import sd_hijack
        from modules.textual_inversion.textual_inversion import Embedding

        db = sd_hijack.model_hijack.embedding_db
        previous = {name: db.word_embeddings.get(name) for name in embeddings}
        weight_dtype = next(self._hooked_text_module().parameters()).dtype
        try:
            for name, emb in embeddings.items():
                db.register_embedding_by_name(self._stand_in(Embedding, name, emb, weight_dtype), self.sd_model, name)
            yield
        finally:
            for name, old in previous.items():
                db.register_embedding_by_name(old, self.sd_model, name)

    def _stand_in(self, embedding_type: Any, name: str, emb: TrainableEmbedding, dtype: torch.dtype) -> Any:
        missing = [s.key for s in self.text_encoders if s.key not in emb.vectors]
        if missing:
            raise ModelMismatchError(f"The embedding '{name}' has no vectors for {', '.join(missing)}, which this "
                                     f"{self.family} model needs: it was made for another model family.")
        # The cast is part of the graph, so gradients still reach the float32 vectors (fp16 text encoders).
        vecs = {s.key: emb.vectors[s.key].to(self.device, dtype) for s in self.text_encoders}
        stand_in = embedding_type(vecs if self.family == SDXL else vecs["clip_l"], name)
        stand_in.vectors, stand_in.shape = emb.n_vectors, self.context_width
        return stand_in

    # --- images -----------------------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> LatentMoments:
        with torch.no_grad(), self._devices.autocast():
            x = pixels.to(self.device, self._vae_dtype())
            moments = self._sgm_moments(x) if self.family == SDXL else None
            posterior: Any = self._vae_call("encode", x) if moments is None else None  # set whenever used below
        if moments is not None:
            mean, logvar = moments.float().chunk(2, dim=1)
            scale = float(self.sd_model.scale_factor)
            return LatentMoments(mean * scale, torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * scale)
        if isinstance(posterior, torch.Tensor):  # sgm: already a scaled sample, no distribution to keep
            z = posterior.float() * (self.sd_model.scale_factor if self._residency.active else 1.0)
            return LatentMoments(z, torch.zeros_like(z))
        scale = float(self.sd_model.scale_factor)
        return LatentMoments(posterior.mean.float() * scale, posterior.std.float() * scale)

    def _sgm_moments(self, x: torch.Tensor) -> torch.Tensor | None:
        """sgm's inference VAE `encode` returns only a sample; its `encoder` and `quant_conv` give the moments
        (the layers ldm builds its DiagonalGaussianDistribution from). None if this VAE lacks them."""
        vae = self.sd_model.first_stage_model
        if not (hasattr(vae, "encoder") and hasattr(vae, "quant_conv")):
            return None
        with self._residency:  # under medvram it moves the VAE in and out itself: no hook is involved
            self._residency.need("vae")
            try:
                return vae.quant_conv(vae.encoder(x))
            finally:
                self._residency.release("vae")

    def decode_latents(self, latents: torch.Tensor, grad: bool = False) -> torch.Tensor:
        if grad:  # the VAE's own decode (ldm's decode_first_stage is no_grad), kept resident for backward
            vae = self.sd_model.first_stage_model
            self._residency.need("vae", pin=True)
            with self._devices.autocast():
                z = latents.to(self.device, self._vae_dtype()) / float(self.sd_model.scale_factor)
                return type(vae).decode(vae, z).float().clamp(-1, 1)
        with torch.no_grad(), self._devices.autocast():
            z = latents.to(self.device, self._vae_dtype())
            pixels = self._vae_call("decode", z)
        return pixels.float().clamp(-1, 1)

    def _vae_dtype(self) -> torch.dtype:
        return next(self.sd_model.first_stage_model.parameters()).dtype

    def _vae_call(self, what: str, x: torch.Tensor) -> Any:
        """`encode_first_stage` / `decode_first_stage`, or, inside a managed step, the VAE's own class methods
        (the WebUI replaced the instance's encode/decode with wrappers that swap modules) with it moved in and out."""
        if not self._residency.active:
            return self.sd_model.encode_first_stage(x) if what == "encode" else self.sd_model.decode_first_stage(x)
        vae = self.sd_model.first_stage_model
        self._residency.need("vae")
        try:
            if what == "encode":
                return type(vae).encode(vae, x)
            return type(vae).decode(vae, x / float(self.sd_model.scale_factor))
        finally:
            self._residency.release("vae")

    # --- denoiser ---------------------------------------------------------------------------------------------
    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning,
                size_cond: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet output in float32; the inner UNet is called directly (A1111's apply_model wrapper casts to
        `dtype_unet`; we cast to the UNet's actual dtype, which is float32 while its weights train)."""
        dtype, device = self.dtype, self.device
        x, t = noisy_latents.to(device, dtype), timesteps.to(device)
        context = cond.context.to(device, dtype)
        y = self._vector(cond, size_cond, x).to(device, dtype) if self.family == SDXL else None
        self._residency.need("unet")
        with self._devices.autocast():
            if self._residency.active or not getattr(self.sd_model, "lowvram", False):
                out = self.sd_model.model.diffusion_model(x, t, context=context, y=y)
            elif self.family == SDXL:  # outside a step under medvram: let the hook bring the UNet in
                out = self.sd_model.model(x, t, {"crossattn": context, "vector": y})
            else:
                out = self.sd_model.model(x, t, c_crossattn=[context])
        return out.float()

    def _vector(self, cond: TextConditioning, size_cond: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """SDXL `y`: pooled text ⧺ Fourier embeddings of original size, crop and target size (sgm's conditioner)."""
        if cond.pooled is None:
            raise ModelMismatchError("SDXL needs pooled text conditioning; encode the prompts with this model.")
        if size_cond is None:
            h, w = x.shape[-2] * self.vae_scale, x.shape[-1] * self.vae_scale
            size_cond = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(x.shape[0], 6)
        parts = [cond.pooled.to(x.device, torch.float32)]
        sizes = size_cond.to(x.device, torch.float32)
        for embedder in self.sd_model.conditioner.embedders:
            key = getattr(embedder, "input_key", None)
            if key in _SIZE_KEYS:
                i = _SIZE_KEYS.index(key) * 2
                parts.append(embedder(sizes[:, i:i + 2]).float())
        return torch.cat(parts, dim=1)

    def context_transform(self, transform: ContextTransform | None) -> AbstractContextManager[None]:
        return nullcontext() if transform is None else self._hypernetwork_hook(transform)

    @contextmanager
    def _hypernetwork_hook(self, transform: ContextTransform) -> Iterator[None]:
        """Stand in for `shared.loaded_hypernetworks` (the WebUI's attention layers read it on every call)."""
        from modules import shared

        saved = shared.loaded_hypernetworks
        shim = HypernetworkShim(transform, self.context_width)
        shared.loaded_hypernetworks = [shim]
        try:
            yield
        finally:
            shared.loaded_hypernetworks = saved
            shim.detach_from(self.sd_model.model)

    def attention_context_widths(self) -> dict[str, set[int]]:
        widths: dict[str, set[int]] = {"cross": set(), "self": set()}
        for name, module in self.sd_model.model.diffusion_model.named_modules():
            to_k = getattr(module, "to_k", None)
            if isinstance(to_k, torch.nn.Linear):
                is_cross = name.endswith("attn2") or to_k.in_features == self.context_width
                widths["cross" if is_cross else "self"].add(to_k.in_features)
        return widths

    def text_chunk_hook(self, hook: ChunkHook) -> AbstractContextManager[None]:
        return chunk_hooked(self, list(zip(self.text_encoders, self._wrappers())), hook)

    # --- weights and jobs -------------------------------------------------------------------------------------
    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """The UNet and the text encoders inside the WebUI's wrappers; a query that changes nothing."""
        modules = {"unet": self.sd_model.model.diffusion_model}
        for i, wrapper in enumerate(self._wrappers()):
            inner = wrapper.wrapped
            encoder = getattr(inner, "transformer", None)
            modules["text_encoder" if i == 0 else "text_encoder_2"] = encoder if encoder is not None else inner.model
        return modules

    @contextmanager
    def training_session(self, setup: TrainingSetup) -> Iterator[TrainingSession]:
        ws.refuse_untrainable(self.sd_model)
        trained = select_trained(self.trainable_modules(), setup.train, self.family)
        compute = compute_dtype(setup.precision, self.dtype)
        supported = ws.autocast_supported(self._devices, compute)
        factory = autocast_factory(self.device, compute, supported)
        with ExitStack() as stack:
            stack.enter_context(ws.generation_state_set_aside(self.sd_model))
            weights = WeightState([self.sd_model], trained)
            stack.callback(weights.restore)
            if setup.gradient_checkpointing:
                stack.enter_context(ws.checkpointed_blocks(self.sd_model.model.diffusion_model))
            if setup.vae_gradient_checkpointing:
                decoder = getattr(self.sd_model.first_stage_model, "decoder", self.sd_model.first_stage_model)
                stack.enter_context(ws.checkpointed_blocks(decoder, ws.VAE_CHECKPOINTED_BLOCKS))
            stack.enter_context(ws.job_autocast(self._devices, factory))
            yield TrainingSession(trained, compute if supported else self.dtype, factory)

    def adapter_targets(self) -> dict[str, AdapterTarget]:
        return {name: target for name, (target, _) in self._adapter_layers().items()}

    def adapter_weight(self, name: str) -> torch.Tensor:
        return layer_weight(self._adapter_layers(), name)

    def check_network_file(self, path: Path) -> NetworkCheck:
        """The built-in Lora extension's own `load_network` on this (loaded) model: the modules it made, by the file
        key each came from; a file it refuses applies nothing. Our reader when the extension is not loaded."""
        import sys

        networks: Any = sys.modules.get("networks")
        if not hasattr(networks, "load_network"):
            return check_with_reader(self._adapter_layers(), path, "our reader (the Lora extension is not loaded)")
        loader = "the WebUI's Lora extension"
        names = _file_modules(path)
        try:
            on_disk_type = getattr(networks, "NetworkOnDisk", None) or networks.network.NetworkOnDisk
            net = networks.load_network(path.stem, on_disk_type(path.stem, str(path)))
        except Exception as exc:  # noqa: BLE001 - the extension's own refusal (an AssertionError) is the answer
            return NetworkCheck(loader, len(names), 0, tuple(names), f"{type(exc).__name__}: {exc}")
        applied = {str(m.network_key).partition(".")[0] for m in net.modules.values()}
        unmatched = tuple(n for n in names if n not in applied)
        return NetworkCheck(loader, len(names), len(names) - len(unmatched), unmatched)

    def weight_adapters(self, adapters: Mapping[str, WeightAdapter]) -> AbstractContextManager[None]:
        return self._adapters.applied(self._adapter_layers(), adapters)

    def _adapter_layers(self) -> Layers:
        """LDM module paths for the UNet; the text encoders' under transformers names (OpenCLIP's through the
        checkpoint mapping, only the layers the embedder runs: SD2's stops before its last)."""
        if self._adapter_layer_map is None:
            layers = unet_layers(self.sd_model.model.diffusion_model, self.family, "ldm")
            modules = self.trainable_modules()
            for (key, prefix), wrapper in zip(text_prefixes(self.family).items(), self._wrappers()):
                encoder = modules[key]
                if hasattr(encoder, "text_model"):
                    layers.update(hf_text_layers(encoder, key, prefix))
                    continue
                run = len(encoder.transformer.resblocks)  # type: ignore[union-attr,arg-type]
                if self.family == SD2:
                    run -= int(getattr(wrapper.wrapped, "layer_idx", 0) or 0)
                layers.update(openclip_text_layers(encoder, key, prefix, run))
            self._adapter_layer_map = layers
        return self._adapter_layer_map

    def placement(self) -> AbstractContextManager[None]:
        return self._residency

    def sample(self, request: SampleRequest, embeddings: Mapping[str, TrainableEmbedding] | None = None,
               context_transform: ContextTransform | None = None,
               adapters: Mapping[str, WeightAdapter] | None = None) -> list[Any]:
        """The WebUI's own txt2img; under a placement it runs paused, so the WebUI's hooks move modules as usual."""
        with ExitStack() as stack:
            stack.enter_context(self._residency.paused())
            stack.enter_context(self._spliced(embeddings or {}))
            stack.enter_context(self.context_transform(context_transform))
            if adapters is not None:
                stack.enter_context(self.weight_adapters(adapters))
            return txt2img(self.sd_model, request)

    def sampler_names(self) -> list[str]:
        return sampler_names()

    def ldm_state_dict(self, modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The WebUI holds the LDM layout itself; only its wrappers (`.wrapped`: the hijack's text wrappers and
        `EmbeddingsWithFixes`) add a level that the checkpoint file does not have."""
        available = {**self.trainable_modules(), "vae": self.sd_model.first_stage_model}
        names = {id(m): name for name, m in self.sd_model.named_modules()}
        out: dict[str, torch.Tensor] = {}
        for key in modules:
            if key not in available:
                raise ModelMismatchError(f"this {self.family} model has no {key}")
            prefix = names[id(available[key])]
            for name, tensor in available[key].state_dict().items():
                full = ".".join(part for part in f"{prefix}.{name}".split(".") if part != "wrapped")
                out[full] = tensor.detach().to("cpu")
        return out


class HypernetworkShim:
    """Looks like a WebUI `Hypernetwork` to `apply_hypernetworks`: `.layers.get(width)` -> (k_fn, v_fn)."""

    def __init__(self, transform: ContextTransform, cross_width: int) -> None:
        self.transform = transform
        self.cross_width = cross_width
        self.name = "finetune"
        self.layers = _ShimLayers(self)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def k(self, context: torch.Tensor) -> torch.Tensor:
        k, v = self.transform(context, context.shape[-1] == self.cross_width)
        self._last = (context, v)
        return k

    def v(self, context: torch.Tensor) -> torch.Tensor:
        # The WebUI calls k then v on the same context: reuse that computation instead of running it twice.
        if self._last is not None and self._last[0] is context:
            v = self._last[1]
            self._last = None
            return v
        return self.transform(context, context.shape[-1] == self.cross_width)[1]

    def detach_from(self, root: torch.nn.Module) -> None:
        """Drop the `hyper_k` / `hyper_v` references the WebUI leaves on attention layers."""
        self._last = None
        for module in root.modules():
            for attr in ("hyper_k", "hyper_v"):
                if getattr(getattr(module, attr, None), "__self__", None) is self:
                    delattr(module, attr)


class _ShimLayers:
    def __init__(self, shim: HypernetworkShim) -> None:
        self._pair = (shim.k, shim.v)

    def get(self, width: int, default: Any = None) -> Any:
        return self._pair


@contextmanager
def _trainable(embedders: list[Any]) -> Iterator[None]:
    """sgm's GeneralConditioner runs every embedder that is not `is_trainable` under no_grad, which would cut the
    gradient to spliced embeddings; marking the text wrappers trainable for one call changes nothing else."""
    saved = [getattr(e, "is_trainable", False) for e in embedders]
    for embedder in embedders:
        embedder.is_trainable = True
    try:
        yield
    finally:
        for embedder, value in zip(embedders, saved):
            embedder.is_trainable = value


def _identity(sd_model: Any) -> ModelIdentity:
    info = getattr(sd_model, "sd_checkpoint_info", None)
    name = getattr(info, "model_name", None) or "unknown"
    shorthash = getattr(info, "shorthash", None) or getattr(sd_model, "sd_model_hash", None) or ""
    source = getattr(info, "filename", None) or ""
    config = getattr(sd_model, "used_config", None) or ""  # the yaml `sd_models.load_model` built it from
    return ModelIdentity(str(name), str(shorthash), str(Path(source)) if source else "", str(config))


def _file_modules(path: Path) -> list[str]:
    """The module names of a network file (its keys before the first "."), without reading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return sorted({key.partition(".")[0] for key in handle.keys()})  # noqa: SIM118 (not a dict)
