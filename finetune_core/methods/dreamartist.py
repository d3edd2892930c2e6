"""DreamArtist (Advanced Prompt Tuning): a positive embedding `NAME` and a negative one `NAME-neg`, learned together.

Objective (methods.md §4.1): the prompt with `NAME` and the same prompt with `NAME-neg` go through the UNet in one
pass on the doubled batch; classifier-free guidance combines them, out = out(neg) + s(t) * (out(pos) - out(neg)),
and the guided output is what the LDM loss compares with the target. On a v-prediction model the outputs are v:
guidance is linear and the map between v and eps at a given x_t and t is affine, so guiding v equals guiding eps,
and the loss is the usual v loss. Optional terms on the clean latent the guided output predicts, decoded with
gradients: lambda_rec * L1 to the training image (same crop and flip), and lambda_d * mean(1 - p_good) of a
ConvNeXt-Tiny discriminator (the original replaced the whole loss with the latter; here it adds).

Each half is an ordinary Textual Inversion embedding (`textual_inversion.TextualInversion` writes and reads it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from finetune_core.errors import ArtifactError, ConfigError
from finetune_core.formats.atomic import require_finite, written_together
from finetune_core.formats.embedding import EmbeddingFile, read_embedding, write_embedding
from finetune_core.formats.names import refuse_same_name
from finetune_core.methods.base import ArtifactMeta, ArtifactMethod, InferenceExtras, MethodSpec, ParamGroup
from finetune_core.methods.discriminator import Discriminator, check_discriminator_file, load_discriminator
from finetune_core.methods.guidance import GuidanceScale, guide, parse_guidance
from finetune_core.methods.textual_inversion import (
    SAVE_FORMATS,
    TextualInversion,
    TextualInversionConfig,
    check_fits,
    initial_vectors,
    resolve_embedding,
)
from finetune_core.model.interface import DiffusionModel
from finetune_core.model.noise_schedule import predicted_x0
from finetune_core.train.memory import MemoryNeeds
from finetune_core.train.objective import weighted_mse
from finetune_core.train.param_group import Averaging
from finetune_core.train.train_batch import TrainBatch

NEGATIVE_SUFFIX = "-neg"
NEGATIVE_INIT_NOISE = 1e-3  # the original adds N(0, 1e-3^2) to a new negative embedding (breaks the symmetry)


def _f(default: Any, label: str, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"label": label, "help": help, **extra})


@dataclass(frozen=True)
class DreamArtistCreate:
    """How a new pair starts (the original's "DreamArtist Create Embedding" form and defaults)."""

    init_text: str = _f("*", "Initialization text", "Words whose token vectors start NAME; empty starts from zeros.")
    num_vectors: int = _f(3, "Number of vectors per token", "Vectors of NAME (the original recommends 3).",
                          minimum=1, maximum=75)
    neg_init_text: str = _f("*", "Negative initialization text", "Words whose token vectors start NAME-neg.")
    neg_num_vectors: int = _f(6, "Negative vectors per token", "Vectors of NAME-neg (3-10 recommended).",
                              minimum=1, maximum=75)

    def validate(self) -> None:
        problems = [f"{what} must be between 1 and 75, got {value}" for what, value in
                    (("number of vectors", self.num_vectors), ("number of negative vectors", self.neg_num_vectors))
                    if not 1 <= value <= 75]
        if problems:
            raise ConfigError(problems)

    def check_request(self, name: str, folder: Path, overwrite: bool) -> None:
        """The name leaves room for `NAME-neg`, which must not exist unless overwriting (needs no model)."""
        if name.endswith(NEGATIVE_SUFFIX):
            raise ConfigError(f"the name {name!r} ends in '{NEGATIVE_SUFFIX}', which DreamArtist keeps for the "
                              f"negative embedding (NAME{NEGATIVE_SUFFIX}); choose a name without it")
        if not overwrite:
            refuse_same_name(folder, name + NEGATIVE_SUFFIX, "embeddings")


@dataclass(frozen=True)
class DreamArtistConfig(DreamArtistCreate):
    """Settings of a DreamArtist run (the original's Train tab, with our names)."""

    continue_from: str = _f("", "Continue from embedding", "An existing positive embedding (path, or name in the "
                            "embeddings folder); its NAME-neg next to it continues too. Empty starts a new pair.")
    cfg_scale: str = _f("3.0", "CFG scale (training)", "Guidance between NAME and NAME-neg while training: a number "
                        "(3-5 usual) or a range over the timestep such as '1.5-3.0', '1.5-3.0:cos' or "
                        "'1.5-3.0:cos2'. With exactly 1, NAME-neg does not learn.")
    neg_lr_weight: float = _f(1.0, "Negative learning-rate weight", "NAME-neg learns at the schedule's rate times "
                              "this, at every step of the schedule.")
    reconstruction: bool = _f(False, "Train with reconstruction", "Also compare the decoded prediction with the "
                              "image in pixels (L1): a full VAE decode and backward per step.")
    reconstruction_weight: float = _f(1.0, "Reconstruction loss weight", "lambda of the pixel L1 term.",
                                      advanced=True)
    discriminator_path: str = _f("", "Discriminator file", "A ConvNeXt-Tiny state dict with 3 classes (class 1 = "
                                 "good) that scores the decoded prediction; needs timm. Empty: off.", advanced=True)
    discriminator_weight: float = _f(1.0, "Discriminator loss weight", "lambda of mean(1 - p(good)); it adds to "
                                     "the loss (the original replaced the loss with it).", advanced=True)
    clip_norm: float = _f(1.0, "Gradient norm limit", "Each embedding's gradient norm is clipped to this at every "
                          "step (the original: 1); 0 turns it off.", advanced=True)
    ema_decay: float = _f(1.0, "EMA (positive)", "Moving-average decay of NAME (0.97 suggested); 1 = off.",
                          advanced=True)
    ema_every: int = _f(25, "EMA replace steps (positive)", "Every N steps the average replaces NAME.",
                       advanced=True)
    neg_ema_decay: float = _f(1.0, "EMA (negative)", "Moving-average decay of NAME-neg; 1 = off.",
                              advanced=True)
    neg_ema_every: int = _f(25, "EMA replace steps (negative)", "Every N steps the average replaces NAME-neg.",
                           advanced=True)
    save_format: str = _f("pt", "File format", "pt: the WebUI's classic format; safetensors: cannot run code when "
                          "loaded (SDXL pairs are always safetensors).", choices=list(SAVE_FORMATS),
                          advanced=True)

    def validate(self) -> None:
        problems = _setting_problems(self)
        try:
            parse_guidance(self.cfg_scale)
        except ConfigError as exc:
            problems.extend(exc.problems)
        if problems:
            raise ConfigError(problems)

    def check_request(self, name: str, folder: Path, overwrite: bool) -> None:
        super().check_request(name, folder, overwrite)
        if self.continue_from:
            read_pair(resolve_embedding(self.continue_from, folder))
        if self.discriminator_path:
            check_discriminator_file(self.discriminator_path)


def _setting_problems(config: DreamArtistConfig) -> list[str]:
    problems: list[str] = []
    try:
        DreamArtistCreate.validate(config)
    except ConfigError as exc:
        problems.extend(exc.problems)
    for what, value in (("neg_lr_weight", config.neg_lr_weight),):
        if not value > 0:
            problems.append(f"{what} must be above 0, got {value}")
    for what, value in (("reconstruction_weight", config.reconstruction_weight),
                        ("discriminator_weight", config.discriminator_weight), ("clip_norm", config.clip_norm)):
        if not value >= 0 or value == float("inf"):
            problems.append(f"{what} must be 0 or more, got {value}")
    for what, decay, every in (("ema", config.ema_decay, config.ema_every),
                               ("neg_ema", config.neg_ema_decay, config.neg_ema_every)):
        if not 0 < decay <= 1:
            problems.append(f"{what}_decay must be above 0 and at most 1 (1 = off), got {decay}")
        if every < 1:
            problems.append(f"{what}_every must be 1 or more, got {every}")
    if config.save_format not in SAVE_FORMATS:
        problems.append(f"file format {config.save_format!r} is not one of {', '.join(SAVE_FORMATS)}")
    return problems


def negative_name(name: str) -> str:
    return name + NEGATIVE_SUFFIX


def negative_prompt(prompt: str, name: str) -> str:
    """The prompt with every whole-word `name` turned into `name-neg` (the original replaced it inside words too)."""
    return re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", negative_name(name), prompt)


def read_pair(positive: Path) -> tuple[EmbeddingFile, EmbeddingFile]:
    """The positive file and its `<stem>-neg` beside it, both finite and of the same widths."""
    if positive.stem.endswith(NEGATIVE_SUFFIX):
        raise ConfigError(f"{positive} is a negative embedding; continue from its positive file (without "
                          f"'{NEGATIVE_SUFFIX}'), and its negative half is found next to it")
    negative_stem = positive.stem + NEGATIVE_SUFFIX
    found = [positive.with_name(negative_stem + positive.suffix)]
    found += sorted(p for p in positive.parent.glob(f"{negative_stem}.*") if p.is_file())
    negative = next((p for p in found if p.is_file()), None)
    if negative is None:
        raise ArtifactError(f"{positive} has no negative half {negative_stem}{positive.suffix} next to it; "
                            f"DreamArtist continues a pair, so put both files in the same folder")
    files = []
    for path in (positive, negative):
        embedding = read_embedding(path)
        require_finite(embedding.vectors.items(), path)
        files.append(embedding)
    widths = [{k: int(v.shape[-1]) for k, v in f.vectors.items()} for f in files]
    if widths[0] != widths[1]:
        raise ArtifactError(f"the halves of the pair do not fit together: {positive} has vectors {widths[0]} and "
                            f"{negative} has {widths[1]}; both must be made for the same model family")
    return files[0], files[1]


def create_pair(model: DiffusionModel, name: str, config: DreamArtistCreate,
                seed: int = 0) -> tuple[EmbeddingFile, EmbeddingFile]:
    """A new pair at step 0 from the two init texts; the negative gets the original's tiny noise."""
    config.validate()
    generator = torch.Generator().manual_seed(seed)
    negative = initial_vectors(model, config.neg_init_text, config.neg_num_vectors)
    negative = {k: v + NEGATIVE_INIT_NOISE * torch.randn(v.shape, generator=generator) for k, v in negative.items()}
    identity = model.identity
    return (EmbeddingFile(name, initial_vectors(model, config.init_text, config.num_vectors), 0, identity.shorthash,
                          identity.name),
            EmbeddingFile(negative_name(name), negative, 0, identity.shorthash, identity.name))



def _averaging(decay: float, every: int) -> Averaging | None:
    """DreamArtist's EMA of a word: decay 1 is off; the average replaces the word every `every` steps."""
    return Averaging(decay, replace_every=every) if decay < 1 else None

class DreamArtist(ArtifactMethod):
    """Two embeddings trained under classifier-free guidance; see the module docstring."""

    name = "dreamartist"
    caches_text = False  # gradients flow through the text encoder into both embeddings

    def __init__(self, config: DreamArtistConfig, positive: EmbeddingFile, negative: EmbeddingFile,
                 discriminator: Discriminator | None = None) -> None:
        self.config = config
        halves = TextualInversionConfig(save_format=config.save_format, save_image_with_embedding=False)
        self.positive = TextualInversion(halves, positive)
        self.negative = TextualInversion(halves, negative)
        self.file = positive  # ArtifactMethod: [name] and the start step are the positive's
        self.scale: GuidanceScale = parse_guidance(config.cfg_scale)
        self.discriminator = discriminator
        self.decodes_latents = config.reconstruction or discriminator is not None

    @property
    def embeddings(self) -> dict[str, Any]:
        return {half.embedding.name: half.embedding for half in (self.positive, self.negative)}

    def check(self, model: DiffusionModel) -> list[str]:
        if self.scale.is_one:
            return [f"with a CFG scale of exactly 1 the guided prediction is {self.positive.embedding.name}'s alone, "
                    f"so {self.negative.embedding.name} does not learn (it is written as it started); a scale of "
                    f"3 to 5 trains both"]
        return []

    def trainable_parameters(self, model: DiffusionModel) -> list[ParamGroup]:
        c = self.config
        return [ParamGroup("positive", list(self.positive.embedding.vectors.values()), clip_norm=c.clip_norm,
                           ema=_averaging(c.ema_decay, c.ema_every)),
                ParamGroup("negative", list(self.negative.embedding.vectors.values()), lr_scale=c.neg_lr_weight,
                           clip_norm=c.clip_norm, ema=_averaging(c.neg_ema_decay, c.neg_ema_every))]

    def guided_output(self, model: DiffusionModel, batch: TrainBatch) -> torch.Tensor:
        """The guided UNet output: one pass on [negative prompts, positive prompts] (one pass of the positive
        prompts alone when the scale is 1 everywhere, where the negative half cancels)."""
        x, t, size = batch.noisy_latents, batch.timesteps, batch.size_cond
        if self.scale.is_one:
            return model.predict(x, t, model.encode_prompts(batch.prompts, self.embeddings), size)
        name = self.positive.embedding.name
        prompts = [negative_prompt(p, name) for p in batch.prompts] + list(batch.prompts)
        cond = model.encode_prompts(prompts, self.embeddings)
        doubled_size = None if size is None else torch.cat([size, size])
        out = model.predict(torch.cat([x, x]), torch.cat([t, t]), cond, doubled_size)
        negative, positive = out.chunk(2)
        return guide(negative, positive, self.scale.at(t, batch.alphas_cumprod.shape[0]))

    def loss(self, model: DiffusionModel, batch: TrainBatch) -> torch.Tensor:
        guided = self.guided_output(model, batch)
        loss = weighted_mse(guided, batch.target, batch.loss_weight, batch.snr_weight)
        if not self.decodes_latents:
            return loss
        x0 = predicted_x0(batch.noisy_latents, guided, batch.timesteps, batch.alphas_cumprod, model.prediction_type)
        pixels = model.decode_latents(x0, grad=True)
        if self.config.reconstruction:
            target = batch.data.pixels
            if target is None:
                raise ConfigError("the reconstruction loss needs the training images, but the dataset kept none")
            loss = loss + self.config.reconstruction_weight * F.l1_loss(pixels, target.to(pixels))
        if self.discriminator is not None:
            loss = loss + self.config.discriminator_weight * self.discriminator.loss(pixels)
        return loss

    def inference_extras(self) -> InferenceExtras:
        """Previews: NAME in the prompt (the training prompt has it), NAME-neg in the negative prompt."""
        return InferenceExtras(embeddings=self.embeddings, negative_prompt_suffix=self.negative.embedding.name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        halves = (("positive", self.positive), ("negative", self.negative))
        return {f"{which}.{key}": value for which, half in halves for key, value in half.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for which, half in (("positive", self.positive), ("negative", self.negative)):
            prefix = f"{which}."
            half.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def artifact_paths(self, directory: Path, stem: str) -> list[Path]:
        return [*self.positive.artifact_paths(directory, stem),
                *self.negative.artifact_paths(directory, negative_name(stem))]

    def write_artifact(self, directory: Path, stem: str, meta: ArtifactMeta, overwrite: bool) -> list[Path]:
        """NAME and NAME-neg land together or not at all (a kill between two writes must not mix runs)."""
        with written_together(directory):
            return [*self.positive.write_artifact(directory, stem, meta, overwrite),
                    *self.negative.write_artifact(directory, negative_name(stem), meta, overwrite)]



def build(model: DiffusionModel, name: str, config: DreamArtistConfig, directory: Path, seed: int) -> DreamArtist:
    """The registry's constructor: continue a pair, or start one from the init texts; load the discriminator."""
    config.validate()
    if config.continue_from:
        positive, negative = read_pair(resolve_embedding(config.continue_from, directory))
        for half, source in ((positive, config.continue_from), (negative, negative_name(config.continue_from))):
            check_fits(model, half, source)
        positive.name, negative.name = name, negative_name(name)
    else:
        positive, negative = create_pair(model, name, config, seed)
    discriminator = load_discriminator(config.discriminator_path, model.device) if config.discriminator_path \
        else None
    return DreamArtist(config, positive, negative, discriminator)


def create_file(model: DiffusionModel, name: str, config: DreamArtistCreate, directory: Path,
                overwrite: bool) -> list[Path]:
    """Write a new, untrained pair `<directory>/<name>.pt` and `<name>-neg.pt` (SDXL: .safetensors)."""
    positive, negative = create_pair(model, name, config)
    suffix = ".safetensors" if positive.is_sdxl else ".pt"
    with written_together(directory):
        return [write_embedding(half, Path(directory) / f"{half.name}{suffix}", overwrite)
                for half in (positive, negative)]


def memory_needs(model: DiffusionModel, config: DreamArtistCreate) -> MemoryNeeds:
    """Both embeddings' vectors (the disk checks; device memory is measured, `finetune_core.jobs.fit`)."""
    width = sum(t.width for t in model.text_encoders)
    return MemoryNeeds((config.num_vectors + config.neg_num_vectors) * width)


class DreamArtistSpec(MethodSpec):
    """DreamArtist as hosts see it."""

    key = DreamArtist.name
    label = "DreamArtist (APT)"
    description = ("A word NAME and its negative NAME-neg learned together under guidance, often from one image; use "
                   "NAME in the prompt and NAME-neg in the negative prompt.")
    config_type = DreamArtistConfig
    create_type = DreamArtistCreate
    output_kind = "embeddings"
    log_folder = "dreamartist"
    data_defaults = {"template": "subject.txt", "attention_masks": True}
    train_defaults = {"learning_rate": "0.003", "steps": 8000}
    needs_name_in_prompt = True  # [name] must appear in the prompts
    name_help = "The embeddings' file name: write NAME in the prompt and NAME-neg in the negative prompt."

    def build(self, model: DiffusionModel, name: str, config: DreamArtistConfig, directory: Path,
              seed: int) -> DreamArtist:
        return build(model, name, config, directory, seed)

    def memory(self, model: DiffusionModel, config: DreamArtistCreate) -> MemoryNeeds:
        return memory_needs(model, config)

    def create(self, model: DiffusionModel, name: str, config: DreamArtistCreate, directory: Path,
               overwrite: bool) -> list[Path]:
        return create_file(model, name, config, directory, overwrite)

    def dataset_needs(self, config: DreamArtistConfig) -> dict[str, Any]:
        """The reconstruction loss compares with the training images: the dataset keeps them."""
        return {"keep_pixels": True} if config.reconstruction else {}

    def continue_from(self, config: DreamArtistConfig) -> str:
        return config.continue_from

    def check_request(self, config: DreamArtistCreate, name: str, folder: Path, overwrite: bool) -> None:
        config.check_request(name, folder, overwrite)


METHOD = DreamArtistSpec()
