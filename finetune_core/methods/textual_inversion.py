"""Textual Inversion: train the vectors of one embedding word; everything else stays frozen.

Objective: the LDM loss (eps or v) with the prompt containing the embedding's name (methods.md §2.1).
Artefact: the WebUI's embedding formats (.pt dict, .safetensors, SDXL clip_l/clip_g, preview .png).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune_core.errors import ConfigError, ModelMismatchError
from finetune_core.formats.atomic import require_finite
from finetune_core.formats.embedding import EmbeddingFile, read_embedding, write_embedding, write_embedding_png
from finetune_core.formats.names import find_artifact
from finetune_core.formats.optim_sidecar import OptimizerSidecar, embedding_checksum, write_optimizer_sidecar
from finetune_core.methods.base import ArtifactMeta, ArtifactMethod, InferenceExtras, MethodSpec, ParamGroup
from finetune_core.model.interface import DiffusionModel, TrainableEmbedding
from finetune_core.train.memory import MemoryNeeds
from finetune_core.train.objective import weighted_mse
from finetune_core.train.train_batch import TrainBatch

SAVE_FORMATS = ("pt", "safetensors")


@dataclass(frozen=True)
class TextualInversionCreate:
    """How a new embedding starts (the WebUI's "Create embedding" form)."""

    init_text: str = field(default="*", metadata={
        "label": "Initialization text",
        "help": "Words whose token vectors start the embedding, spread over its vectors; empty starts from zeros."})
    num_vectors: int = field(default=1, metadata={
        "label": "Number of vectors per token", "help": "More vectors hold more detail but overfit sooner "
        "and use more of the 75-token prompt budget.", "minimum": 1, "maximum": 75})

    def validate(self) -> None:
        """Raise ConfigError listing every problem."""
        problems = _create_problems(self)
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class TextualInversionConfig(TextualInversionCreate):
    """Settings of a Textual Inversion run."""

    continue_from: str = field(default="", metadata={
        "label": "Continue from embedding",
        "help": "An existing embedding file (path, or name in the embeddings folder) to keep training from its "
                "step; empty starts a new embedding from the initialization text."})
    save_format: str = field(default="pt", metadata={
        "label": "File format", "choices": list(SAVE_FORMATS), "advanced": True,
        "help": "pt: the WebUI's classic format; safetensors: cannot run code when loaded."})
    save_image_with_embedding: bool = field(default=True, metadata={
        "label": "Save images with embedding in PNG chunks", "advanced": True,
        "help": "Each preview also goes to image_embeddings/ as a PNG that carries the embedding (SD1/SD2)."})

    def validate(self) -> None:
        """Raise ConfigError listing every problem."""
        problems = _create_problems(self)
        if self.save_format not in SAVE_FORMATS:
            problems.append(f"file format {self.save_format!r} is not one of {', '.join(SAVE_FORMATS)}")
        if problems:
            raise ConfigError(problems)


def _create_problems(config: TextualInversionCreate) -> list[str]:
    if not 1 <= config.num_vectors <= 75:
        return [f"number of vectors per token must be between 1 and 75, got {config.num_vectors}"]
    return []


def initial_vectors(model: DiffusionModel, init_text: str, num_vectors: int) -> dict[str, torch.Tensor]:
    """Spread the init text's token vectors over `num_vectors` rows: row i = token[i*m//n] (WebUI create_embedding).

    An empty init text gives zeros.
    """
    if not init_text:
        return {enc.key: torch.zeros(num_vectors, enc.width) for enc in model.text_encoders}
    tokens = model.token_vectors(init_text)
    out = {}
    for key, emb in tokens.items():
        count = emb.shape[0]
        if count == 0:
            raise ConfigError(f"the initialization text {init_text!r} has no tokens; type a word or leave it empty")
        rows = [emb[i * count // num_vectors] for i in range(num_vectors)]
        out[key] = torch.stack(rows).float().clone()
    return out


def create_embedding(model: DiffusionModel, name: str, config: TextualInversionCreate) -> EmbeddingFile:
    """A new embedding at step 0, stamped with the model's identity."""
    config.validate()
    return EmbeddingFile(name=name, vectors=initial_vectors(model, config.init_text, config.num_vectors), step=0,
                         sd_checkpoint=model.identity.shorthash, sd_checkpoint_name=model.identity.name)


def check_fits(model: DiffusionModel, embedding: EmbeddingFile, source: str) -> None:
    """Refuse an embedding whose widths are not the loaded model's text widths."""
    expected = {enc.key: enc.width for enc in model.text_encoders}
    got = {key: int(vec.shape[-1]) for key, vec in embedding.vectors.items()}
    if set(got) != set(expected) or any(got[k] != expected[k] for k in expected):
        raise ModelMismatchError(
            f"{source} has vectors {_widths(got)} but the loaded {model.family.upper()} model needs "
            f"{_widths(expected)}; "
            f"an embedding only works on the model family it was trained for")


def _widths(widths: Mapping[str, int]) -> str:
    return " + ".join(f"{k} {w}" for k, w in widths.items())


class TextualInversion(ArtifactMethod):
    """The Method for Textual Inversion: one embedding's vectors are the only trainable parameters."""

    name = "textual-inversion"
    caches_text = False  # gradients flow through the text encoder into the vectors

    def __init__(self, config: TextualInversionConfig, embedding: EmbeddingFile) -> None:
        self.config = config
        self.file = embedding
        self.embedding = TrainableEmbedding(embedding.name, {k: v.detach().clone().float().requires_grad_(True)
                                                             for k, v in embedding.vectors.items()})

    def trainable_parameters(self, model: DiffusionModel) -> list[ParamGroup]:
        return [ParamGroup("embedding", list(self.embedding.vectors.values()), weight_decay=0.0)]

    def loss(self, model: DiffusionModel, batch: TrainBatch) -> torch.Tensor:
        cond = model.encode_prompts(batch.prompts, {self.embedding.name: self.embedding})
        pred = model.predict(batch.noisy_latents, batch.timesteps, cond, batch.size_cond)
        return weighted_mse(pred, batch.target, batch.loss_weight, batch.snr_weight)

    def inference_extras(self) -> InferenceExtras:
        return InferenceExtras(embeddings={self.embedding.name: self.embedding})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: vec.detach().clone() for key, vec in self.embedding.vectors.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, vec in self.embedding.vectors.items():
                vec.copy_(state[key])

    def current_file(self, meta: ArtifactMeta) -> EmbeddingFile:
        """The embedding as a file object at `meta.step`, with detached CPU float32 vectors."""
        vectors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.embedding.vectors.items()}
        return EmbeddingFile(name=self.file.name, vectors=vectors, step=meta.step,
                             sd_checkpoint=meta.model.shorthash, sd_checkpoint_name=meta.model.name)

    def artifact_paths(self, directory: Path, stem: str) -> list[Path]:
        """The file a write produces. SDXL is always .safetensors: its .pt form can hold only the two tensors, so
        the name and step (needed to continue training) would be lost; the WebUI reads both."""
        fmt = "safetensors" if len(self.embedding.vectors) > 1 else self.config.save_format
        return [Path(directory) / f"{stem}.{fmt}"]

    def preview_artifact(self, image: Any, directory: Path, stem: str, meta: ArtifactMeta) -> list[Path]:
        """The WebUI's preview PNG carrying the embedding (SD1/SD2 only: SDXL embeddings have no image form)."""
        if not self.config.save_image_with_embedding or len(self.embedding.vectors) > 1:
            return []
        path = Path(directory) / f"{stem}.png"
        write_embedding_png(self.current_file(meta), image, path, overwrite=True)
        return [path]

    def optimizer_sidecar(self, artifact: Path, optimizer: torch.optim.Optimizer,
                          optimizer_name: str) -> Path | None:
        """The WebUI's `<file>.pt.optim`, keyed by its 4-digit checksum of the vectors (SD1/SD2 `.pt` only). The
        WebUI loads it into AdamW, so only AdamW/Adam state (the same entries) is written."""
        if optimizer_name not in ("adamw", "adam"):
            return None
        vectors = next(iter(self.embedding.vectors.values()))
        sidecar = OptimizerSidecar(hash=embedding_checksum(vectors), optimizer_state_dict=optimizer.state_dict())
        return write_optimizer_sidecar(artifact, sidecar)

    def write_artifact(self, directory: Path, stem: str, meta: ArtifactMeta, overwrite: bool) -> list[Path]:
        paths = self.artifact_paths(directory, stem)
        write_embedding(self.current_file(meta), paths[0], overwrite=overwrite)
        return paths


def load_for_training(model: DiffusionModel, name: str, config: TextualInversionConfig,
                      embeddings_dir: Path) -> TextualInversion:
    """Build the method: continue an existing embedding file, or start a new one from the init text."""
    config.validate()
    if config.continue_from:
        source = resolve_embedding(config.continue_from, embeddings_dir)
        existing = read_embedding(source)
        require_finite(existing.vectors.items(), source)
        check_fits(model, existing, str(source))
        existing.name = name
        return TextualInversion(config, existing)
    return TextualInversion(config, create_embedding(model, name, config))


def resolve_embedding(reference: str, embeddings_dir: Path) -> Path:
    """A path, or a name in the embeddings folder with any of the WebUI's extensions."""
    return find_artifact(reference, embeddings_dir, (".pt", ".safetensors", ".bin", ".png", ".webp"), "embedding")



def create_file(model: DiffusionModel, name: str, config: TextualInversionCreate, directory: Path,
                overwrite: bool) -> list[Path]:
    """Write a new, untrained embedding `<directory>/<name>.pt` (the WebUI's Create embedding)."""
    return [write_embedding(create_embedding(model, name, config), Path(directory) / f"{name}.pt", overwrite)]


def build(model: DiffusionModel, name: str, config: TextualInversionConfig, directory: Path,
          seed: int) -> TextualInversion:
    """The registry's constructor: continue a file or start from the init text (seed unused: init is exact)."""
    return load_for_training(model, name, config, directory)


def memory_needs(model: DiffusionModel, config: TextualInversionCreate) -> MemoryNeeds:
    """The embedding's vectors: one row per vector for each text encoder."""
    return MemoryNeeds(config.num_vectors * sum(t.width for t in model.text_encoders))


class TextualInversionSpec(MethodSpec):
    """Textual Inversion as hosts see it."""

    key = TextualInversion.name
    label = "Textual Inversion"
    description = "Learn a new word (an embedding) for a subject or style; the model stays unchanged."
    config_type = TextualInversionConfig
    create_type = TextualInversionCreate
    output_kind = "embeddings"
    log_folder = "textual_inversion"
    data_defaults = {"template": "style_filewords.txt"}
    train_defaults = {"learning_rate": "0.005"}
    needs_name_in_prompt = True  # the trained word must appear in the prompts
    name_help = "The embedding's file name, and the word you write in prompts."

    def build(self, model: DiffusionModel, name: str, config: TextualInversionConfig, directory: Path,
              seed: int) -> TextualInversion:
        return build(model, name, config, directory, seed)

    def memory(self, model: DiffusionModel, config: TextualInversionCreate) -> MemoryNeeds:
        return memory_needs(model, config)

    def create(self, model: DiffusionModel, name: str, config: TextualInversionCreate, directory: Path,
               overwrite: bool) -> list[Path]:
        return create_file(model, name, config, directory, overwrite)

    def continue_from(self, config: TextualInversionConfig) -> str:
        return config.continue_from


METHOD = TextualInversionSpec()
