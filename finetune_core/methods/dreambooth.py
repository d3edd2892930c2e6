"""DreamBooth: fine-tune the model's own UNet (and optionally its text encoders) on instance images, optionally
with prior preservation, and write a single-file checkpoint the WebUI loads (methods.md §6).

Objective: the LDM loss (eps or v) on the instance prompt, plus λ times the loss on class images the model made
(`prior_preservation`). The loop makes the trained modules float32 masters for the job and gives the model back
exactly as it was. Artefact: the source checkpoint with the trained weights in place of its own (everything else
carried over unchanged), under the original LDM keys, `.safetensors` (or `.ckpt`), and its `.yaml` when needed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune_core.data.data_batch import TrainingData
from finetune_core.data.dataset_config import DatasetConfig
from finetune_core.errors import ConfigError, ModelMismatchError
from finetune_core.formats.atomic import atomic_write
from finetune_core.formats.checkpoint import detect_family, over_source, tensor_shapes, write_checkpoint
from finetune_core.methods.base import ArtifactMeta, Method, MethodSpec, ParamGroup, PrepareContext, StatePolicy
from finetune_core.methods.prior_preservation import (
    PriorPreservationSettings,
    check_class_sampler,
    generate_class_images,
    instance_lines,
    instance_prompt_field,
    instance_token_field,
    paired_images,
    prior_loss,
    resolve_class_folder,
)
from finetune_core.model.interface import V_PREDICTION, DiffusionModel
from finetune_core.settings import type_problems
from finetune_core.train.lr_schedule import parse_schedule
from finetune_core.train.memory import MemoryNeeds, model_parameters
from finetune_core.train.param_group import Averaging
from finetune_core.train.train_batch import TrainBatch

SAVE_FORMATS = ("safetensors", "ckpt")
SAVE_PRECISIONS = ("fp16", "fp32")


def _f(default: Any, label: str, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"label": label, "help": help, **extra})


@dataclass(frozen=True)
class DreamBoothSettings:
    """DreamBooth's own fields (the config adds prior preservation's after them)."""

    instance_prompt: str = instance_prompt_field("a photo of [name]")
    instance_token: str = instance_token_field("sks")
    train_text_encoder: bool = _f(False, "Train the text encoder(s)", "Also fine-tune the text encoder(s) (both on "
                                  "SDXL): stronger likeness, more memory.")
    text_encoder_lr: str = _f("", "Text encoder learning rate", "A rate or schedule for the text encoder(s); "
                              "empty: the UNet's.", advanced=True)
    text_encoder_steps: int = _f(0, "Train the text encoder for N steps", "Then freeze it; 0: all steps.",
                                 advanced=True)
    ema_decay: float = _f(0.0, "EMA decay", "Keep an exponential moving average of the UNet and save it instead "
                          "(0.9999 is usual; 0: off).", advanced=True)
    ema_on_cpu: bool = _f(False, "EMA on the CPU", "Keep the average in RAM, not on the device (saves the size of "
                          "the UNet in float32, costs a copy per step).", advanced=True)
    save_format: str = _f("safetensors", "Checkpoint format", "safetensors, or ckpt ({'state_dict': ...}).",
                          choices=list(SAVE_FORMATS), advanced=True)
    save_precision: str = _f("fp16", "Trained weights saved in", "fp16 halves the file; the weights carried over "
                             "from the source keep their own precision.", choices=list(SAVE_PRECISIONS),
                             advanced=True)
    keep_resume_state: bool = _f(False, "Keep resume state", "Write the weights and the optimizer into the run "
                                 "folder at every save for an exact resume (3x the UNet in float32 on disk).",
                                 advanced=True)


@dataclass(frozen=True)
class DreamBoothConfig(PriorPreservationSettings, DreamBoothSettings):
    """Settings of a DreamBooth run."""

    def validate(self) -> None:
        """Raise ConfigError listing every problem; changes nothing."""
        wrong = type_problems(self)
        if wrong:
            raise ConfigError(wrong)
        problems = self.prior_problems()
        for name, allowed in (("save_format", SAVE_FORMATS), ("save_precision", SAVE_PRECISIONS)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not self.instance_token.strip() and "[name]" in self.instance_prompt:
            problems.append("the instance prompt uses [name] but the instance token is empty; type a rare word")
        if self.text_encoder_lr:
            try:
                parse_schedule(self.text_encoder_lr, 1, "text encoder learning rate")
            except ConfigError as exc:
                problems.extend(exc.problems)
        if self.text_encoder_steps < 0 or not 0 <= self.ema_decay < 1:
            problems.append("text_encoder_steps must be 0 or more and ema_decay from 0 up to (not including) 1")
        if problems:
            raise ConfigError(problems)


class DreamBooth(Method):
    """The Method for DreamBooth: the trainable state is the model's own UNet (and text encoders)."""

    name = "dreambooth"

    def __init__(self, model: DiffusionModel, config: DreamBoothConfig, name: str) -> None:
        self.model, self.config, self.output_name = model, config, name
        encoders = tuple(k for k in model.trainable_modules() if k.startswith("text_encoder"))
        self.trains = ("unet", *encoders) if config.train_text_encoder else ("unet",)
        self.caches_text = not config.train_text_encoder
        # No in-memory copies of every weight for rollback; resume state only when asked (3x the UNet on disk).
        self.state_policy = StatePolicy(rollback_snapshots=False, resume_state=config.keep_resume_state)

    @property
    def placeholder(self) -> str:
        return self.config.instance_token

    @property
    def start_step(self) -> int:
        return 0

    def _unet_params(self, model: DiffusionModel) -> list[torch.Tensor]:
        return list(model.trainable_modules()["unet"].parameters())

    def trainable_parameters(self, model: DiffusionModel) -> list[ParamGroup]:
        # The average of the UNet is what the checkpoint holds (LitEma's warm-up, as LDM's own EMA).
        ema = Averaging(self.config.ema_decay, warmup=True, on_cpu=self.config.ema_on_cpu, saved=True) \
            if self.config.ema_decay else None
        groups = [ParamGroup("unet", self._unet_params(model), ema=ema)]
        if self.config.train_text_encoder:
            modules = model.trainable_modules()
            params: list[torch.Tensor] = [p for name in self.trains if name != "unet"
                                          for p in modules[name].parameters()]
            groups.append(ParamGroup("text_encoder", params, learning_rate=self.config.text_encoder_lr,
                                     stop_step=self.config.text_encoder_steps))
        return groups

    def prepare(self, context: PrepareContext) -> None:
        generate_class_images(context, self.config)

    def loss(self, model: DiffusionModel, batch: TrainBatch) -> torch.Tensor:
        cond = batch.cond if batch.cond is not None else model.encode_prompts(batch.prompts)
        pred = model.predict(batch.noisy_latents, batch.timesteps, cond, batch.size_cond)
        return prior_loss(pred, batch, self.config.prior_loss_weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Nothing of its own: the weights are the loop's parameters, their average the loop's too."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        pass

    def check(self, model: DiffusionModel) -> list[str]:
        return check_model(self.config, model)

    # --- the artefact -----------------------------------------------------------------------------------------
    def _yaml_source(self) -> Path | None:
        """The .yaml the checkpoint needs: the source's own, else (v-prediction) the one the model was built from."""
        identity = self.model.identity
        beside = Path(identity.source).with_suffix(".yaml") if identity.source else None
        if beside is not None and beside.is_file():
            return beside
        if self.model.prediction_type == V_PREDICTION and identity.config and Path(identity.config).is_file():
            return Path(identity.config)
        return None

    def artifact_paths(self, directory: Path, stem: str) -> list[Path]:
        paths = [Path(directory) / f"{stem}.{self.config.save_format}"]
        return paths + ([Path(directory) / f"{stem}.yaml"] if self._yaml_source() is not None else [])

    def write_artifact(self, directory: Path, stem: str, meta: ArtifactMeta, overwrite: bool) -> list[Path]:
        paths = self.artifact_paths(directory, stem)
        state = self.checkpoint_state()
        metadata = self._metadata(meta) if self.config.save_format == "safetensors" else None
        write_checkpoint(state, paths[0], overwrite=overwrite, metadata=metadata)
        yaml = self._yaml_source()
        if yaml is not None:
            atomic_write(paths[1], lambda tmp: shutil.copyfile(yaml, tmp), overwrite=True)
        return paths

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The checkpoint: the trained modules (the UNet's EMA when kept) in the save precision, over the source."""
        model = self.model
        trained = model.ldm_state_dict(self.trains)  # the loop has swapped the UNet's average in, when kept
        dtype = torch.float16 if self.config.save_precision == "fp16" else torch.float32
        trained = {k: v.to(dtype) if v.is_floating_point() else v for k, v in trained.items()}
        if _source_file(model) is not None:
            return over_source(trained, model.identity.source)
        others = tuple(n for n in (*model.trainable_modules(), "vae") if n not in self.trains)
        return {**model.ldm_state_dict(others), **trained}

    def _metadata(self, meta: ArtifactMeta) -> dict[str, str]:
        return {"sd_checkpoint": meta.model.shorthash, "sd_checkpoint_name": meta.model.name,
                "finetune_method": self.name, "finetune_step": str(meta.step), "finetune_family": meta.family,
                "finetune_prediction_type": self.model.prediction_type,
                "finetune_ema": "true" if self.config.ema_decay else "false",
                "finetune_settings": json.dumps(dict(meta.settings), default=str, sort_keys=True)}


def _source_file(model: DiffusionModel) -> Path | None:
    source = Path(model.identity.source) if model.identity.source else None
    return source if source is not None and source.is_file() and source.suffix.lower() in (".safetensors",
                                                                                             ".ckpt") else None


def check_model(config: DreamBoothConfig, model: DiffusionModel) -> list[str]:
    """Refuse what cannot work with the loaded model; warnings for what works but is probably not meant."""
    warnings = []
    check_class_sampler(config, model)
    source = _source_file(model)
    if source is not None:
        family = detect_family(tensor_shapes(source))
        if family != model.family:
            raise ModelMismatchError(f"the checkpoint file {source} is {family.upper()}, but the loaded model is "
                                     f"{model.family.upper()}: the file changed since the model was loaded; load it "
                                     f"again (or the one you meant) and start again")
    else:
        warnings.append(f"the model {model.identity.name} has no checkpoint file to carry untouched weights from; "
                        f"the new checkpoint gets the model's own VAE and text encoders, and no schedule buffers "
                        f"or EMA weights")
    if config.text_encoder_lr and not config.train_text_encoder:
        warnings.append("a text encoder learning rate is set but the text encoder is not trained (turn on "
                        "'Train the text encoder(s)'); the rate is ignored")
    if config.text_encoder_steps and not config.train_text_encoder:
        warnings.append("text encoder steps are set but the text encoder is not trained; the setting is ignored")
    return warnings


def build(model: DiffusionModel, name: str, config: DreamBoothConfig, directory: Path, seed: int) -> DreamBooth:
    """The registry's constructor: the method over the loaded model (nothing is read or copied yet)."""
    config.validate()
    return DreamBooth(model, config, name)


def training_data(config: DreamBoothConfig, data: DatasetConfig, name: str) -> Any:
    """`MethodSpec.data`: instance images under the instance prompt, paired with class images when asked."""
    return paired_images(config, data, instance_lines(config), config.instance_token)


def memory_needs(model: DiffusionModel, config: DreamBoothConfig) -> MemoryNeeds:
    """The trained weights and the checkpoint file's size, for the disk checks (device memory is measured,
    `finetune_core.jobs.fit`)."""
    modules = model.trainable_modules()
    unet = sum(p.numel() for p in modules["unet"].parameters())
    encoders = sum(p.numel() for n, m in modules.items() if n != "unet" for p in m.parameters())
    trainable = unet + (encoders if config.train_text_encoder else 0)
    saved = 2 if config.save_precision == "fp16" else 4
    source = _source_file(model)
    carried = source.stat().st_size if source is not None else 4 * (model_parameters(model) - trainable)
    return MemoryNeeds(trainable, artifact_bytes=carried + saved * trainable)


class DreamBoothSpec(MethodSpec):
    """DreamBooth as hosts see it."""

    key = DreamBooth.name
    label = "DreamBooth"
    description = ("Fine-tune the model itself on your subject, optionally with prior preservation; writes a "
                   "checkpoint.")
    config_type = DreamBoothConfig
    output_kind = "checkpoints"
    log_folder = "dreambooth"
    train_defaults = {"learning_rate": "0.000005", "steps": 800, "save_every": 0, "preview_every": 200,
                      "csv_every": 50}
    usual_max_lr = 1e-3
    name_help = "The new checkpoint's file name; in prompts your subject is the instance token (e.g. sks)."

    def build(self, model: DiffusionModel, name: str, config: DreamBoothConfig, directory: Path,
              seed: int) -> DreamBooth:
        return build(model, name, config, directory, seed)

    def memory(self, model: DiffusionModel, config: DreamBoothConfig) -> MemoryNeeds:
        return memory_needs(model, config)

    def data(self, config: DreamBoothConfig, data: DatasetConfig, name: str) -> TrainingData:
        return training_data(config, data, name)

    def resolve(self, config: DreamBoothConfig, data: DatasetConfig, method_folder: Path) -> DreamBoothConfig:
        return resolve_class_folder(config, data, method_folder)

    def pairs_class_images(self, config: DreamBoothConfig) -> bool:
        return config.prior_preservation

    def trains_text_encoders(self, config: DreamBoothConfig) -> bool:
        return config.train_text_encoder


METHOD = DreamBoothSpec()
