"""Tiny fakes for loop tests: a DiffusionModel, a Method (one learnable context vector) and a TrainingData."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from finetune_core.data.data_batch import DataBatch
from finetune_core.data.summary import DatasetSummary
from finetune_core.formats.atomic import load_pt, save_pt
from finetune_core.methods.base import ArtifactMeta, InferenceExtras, Method, ParamGroup
from finetune_core.model.interface import (
    EPSILON,
    LatentMoments,
    ModelIdentity,
    SampleRequest,
    TextConditioning,
    TextEncoderSpec,
    TrainingSession,
    TrainingSetup,
)
from finetune_core.model.session import WeightState, autocast_factory, compute_dtype
from finetune_core.train.objective import weighted_mse
from finetune_core.train.train_batch import TrainBatch


class FakeModel:
    """A conv "UNet" whose output depends on the noisy latents, the timestep and the text context."""

    family = "sd1"
    identity = ModelIdentity("fake", "0123456789")
    text_encoders = (TextEncoderSpec("clip_l", 8),)
    latent_channels = 4
    vae_scale = 8

    def __init__(self, prediction_type: str = EPSILON) -> None:
        self.prediction_type = prediction_type
        gen = torch.Generator().manual_seed(1234)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.proj = torch.nn.Linear(8, 4)
        with torch.no_grad():
            for p in [*self.conv.parameters(), *self.proj.parameters()]:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
                p.requires_grad_(False)
        self.encoded: list[str] = []
        self.placements = 0
        self.sessions: list[TrainingSetup] = []
        self.samples: list[SampleRequest] = []
        self.sample_extras: list[Any] = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def context_width(self) -> int:
        return 8

    def alphas_cumprod(self) -> torch.Tensor:
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        return torch.cumprod(1 - betas, 0).float()

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def token_vectors(self, text: str) -> dict[str, torch.Tensor]:
        return {"clip_l": torch.zeros(len(text.split()), 8)}

    def encode_prompts(self, prompts: list[str], embeddings: Any = None) -> TextConditioning:
        self.encoded.extend(prompts)
        rows = [torch.randn(3, 8, generator=torch.Generator().manual_seed(zlib.crc32(p.encode()))) for p in prompts]
        return TextConditioning(torch.stack(rows))

    def encode_images(self, pixels: torch.Tensor) -> LatentMoments:
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)
        mean = torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)
        return LatentMoments(mean, torch.zeros_like(mean))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(latents[:, :3], scale_factor=8).clamp(-1, 1)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning,
                size_cond: torch.Tensor | None = None) -> torch.Tensor:
        shift = self.proj(cond.context.mean(1))[:, :, None, None]
        scale = (1 + timesteps.float() / 1000)[:, None, None, None]
        return self.conv(noisy_latents) + shift * scale

    def context_transform(self, transform: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def attention_context_widths(self) -> dict[str, set[int]]:
        return {"cross": {8}, "self": {4}}

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.conv}

    @contextlib.contextmanager
    def training_session(self, setup: TrainingSetup):  # type: ignore[no-untyped-def]
        self.sessions.append(setup)
        trained = {name: self.conv for name in setup.train}
        weights = WeightState([self.conv, self.proj], trained)
        compute = compute_dtype(setup.precision, torch.float32)
        try:
            yield TrainingSession(trained, compute, autocast_factory(self.device, compute))
        finally:
            weights.restore()

    @contextlib.contextmanager
    def placement(self):  # type: ignore[no-untyped-def]
        self.placements += 1
        yield

    def text_chunk_hook(self, hook: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def sampler_names(self) -> list[str]:
        return ["DPM++ 2M"]

    def sample(self, request: SampleRequest, embeddings: Any = None, context_transform: Any = None,
               adapters: Any = None) -> list[Any]:
        """Records calls; a grey image of the asked size. Draws from the global RNG to prove isolation."""
        torch.randn(100)
        self.samples.append(request)
        self.sample_extras.append((embeddings, context_transform, adapters))
        return [Image.new("RGB", (request.width, request.height), (128, 128, 128)) for _ in request.prompts]

    def ldm_state_dict(self, modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return {f"model.diffusion_model.{k}": v.detach().clone() for k, v in self.conv.state_dict().items()}


class FakeMethod(Method):
    """One learnable vector added to the text context; loss = weighted MSE of the model's prediction (+ dropout)."""

    name = "fake"
    caches_text = True

    def __init__(self, nan_calls: tuple[int, ...] = (), dropout: float = 0.1) -> None:
        self.vector = torch.full((8,), 0.1, requires_grad=True)
        self.nan_calls = set(nan_calls)
        self.dropout = dropout
        self.calls = 0
        self.after_steps = 0

    @property
    def placeholder(self) -> str:
        return "fake"

    @property
    def start_step(self) -> int:
        return 0

    def trainable_parameters(self, model: Any) -> list[ParamGroup]:
        return [ParamGroup("vector", [self.vector])]

    def loss(self, model: Any, batch: TrainBatch) -> torch.Tensor:
        self.calls += 1
        assert batch.cond is not None
        cond = TextConditioning(batch.cond.context + self.vector, batch.cond.pooled)
        pred = model.predict(batch.noisy_latents, batch.timesteps, cond)
        pred = torch.nn.functional.dropout(pred, self.dropout, training=self.dropout > 0)
        loss = weighted_mse(pred, batch.target, batch.loss_weight, batch.snr_weight)
        return loss * float("nan") if self.calls in self.nan_calls else loss

    def after_step(self, model: Any) -> None:
        self.after_steps += 1

    def inference_extras(self) -> InferenceExtras:
        return InferenceExtras(negative_prompt_suffix="fake-neg")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"vector": self.vector.detach().clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.vector.copy_(state["vector"])

    def write_artifact(self, directory: Path, stem: str, meta: ArtifactMeta, overwrite: bool) -> list[Path]:
        path = save_pt({"vector": self.vector.detach().clone(), "step": meta.step}, Path(directory) / f"{stem}.pt",
                       overwrite)
        return [path]


def read_vector(path: Path) -> torch.Tensor:
    return load_pt(path)["vector"]


class FakeData:
    """n fixed latents with prompts "item i"; each epoch is a seeded permutation (deterministic get_batch)."""

    def __init__(self, n: int = 4, batch_size: int = 1, size: int = 4, alpha: bool = False) -> None:
        gen = torch.Generator().manual_seed(99)
        self.latents = torch.randn(n, 4, size, size, generator=gen)
        self.weights = torch.rand(n, 1, size, size, generator=gen) + 0.5 if alpha else None
        self.prompts = [f"item {i}" for i in range(n)]
        self.batch_size = batch_size
        self.prepared = 0

    def prepare(self, model: Any, on_progress: Any = None) -> None:
        self.prepared += 1

    def batches_per_epoch(self) -> int:
        return len(self.prompts) // self.batch_size

    def summary(self) -> DatasetSummary:
        size = self.latents.shape[-1] * 8
        return DatasetSummary({"fake": len(self.prompts)}, {"fake": {p: 1 for p in self.prompts}},
                              {(size, size): len(self.prompts)}, (size, size))

    def get_batch(self, index: int, seed: int) -> DataBatch:
        per_epoch = self.batches_per_epoch()
        generator = torch.Generator().manual_seed(seed * 7919 + index // per_epoch)
        order = torch.randperm(len(self.prompts), generator=generator)
        start = (index % per_epoch) * self.batch_size
        ids = order[start:start + self.batch_size].tolist()
        weight = None if self.weights is None else self.weights[ids].clone()
        return DataBatch(self.latents[ids].clone(), [self.prompts[i] for i in ids],
                         torch.zeros(len(ids), 6), loss_weight=weight)
