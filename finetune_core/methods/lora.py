"""LoRA: adapters on the UNet's attention and projection layers (optionally its 3x3 convolutions, "LoCon", and the
text encoders); the model's own weights stay frozen. The adapters are of any network type the WebUI's built-in Lora
extension loads (`--network lora|loha|lokr|ia3|oft|glora|full|norm`, `--dora`; `formats.networks`). Objective: the
LDM loss with the adapters applied. Artefact: kohya's / LyCORIS's `.safetensors` (lora.md §1) in `models/Lora/`,
with a preview PNG next to it.

Two modes: captioned-set mode (the default: the dataset's captions through its template, `[name]` = the LoRA's
name) and DreamBooth mode (an instance prompt and token, and prior preservation: class images the model makes,
trained in the same UNet pass with `instance loss + λ · class loss`, methods.md §6), which shares DreamBooth's
class images and their manifest (`prior_preservation`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from finetune_core.data.data_batch import TrainingData
from finetune_core.data.dataset_config import DatasetConfig
from finetune_core.data.summary import DatasetSummary
from finetune_core.errors import ConfigError
from finetune_core.formats.atomic import atomic_write
from finetune_core.formats.lora_file import SAVE_DTYPES, NetworkFile, base_version, write_lora
from finetune_core.formats.networks import NETWORK_TYPES
from finetune_core.methods.base import ArtifactMeta, InferenceExtras, Method, MethodSpec, ParamGroup, PrepareContext
from finetune_core.methods.lora_net import LoraNetwork, NetworkAdapter, layer_of
from finetune_core.methods.lora_setup import build_network, requested_targets
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
from finetune_core.model.interface import V_PREDICTION, DiffusionModel, NetworkCheck, WeightAdapter
from finetune_core.train.memory import MemoryNeeds
from finetune_core.train.train_batch import TrainBatch


def _f(default: Any, label: str, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"label": label, "help": help, **extra})


_RANKED = tuple(name for name, kind in NETWORK_TYPES.items() if kind.has_rank)
_CONV = tuple(name for name, kind in NETWORK_TYPES.items() if kind.has_rank and "conv" in kind.kinds)
_TYPES_HELP = "; ".join(f"{name}: {kind.trains}" for name, kind in NETWORK_TYPES.items())


@dataclass(frozen=True)
class LoraSettings:
    """LoRA's own fields, kohya's names in brackets (the config adds prior preservation's after them). A field that
    belongs to some network types only says which in its `types`; setting it for another type is refused."""

    network: str = _f("lora", "Network type", f"What each adapted layer trains ({_TYPES_HELP}); every type loads "
                      f"in the WebUI's built-in Lora extension.", choices=tuple(NETWORK_TYPES))
    dora: bool = _f(False, "DoRA", "Weight-decomposed (DoRA): also train each layer's magnitude per input column "
                    "(dora_scale); lora, loha and lokr.", types=tuple(n for n, k in NETWORK_TYPES.items()
                                                                       if k.has_dora), advanced=True)
    rank: int = _f(16, "Rank", "Rank of every adapter (network_dim): its size and capacity; 4-32 for a subject or "
                   "style, higher for more detail.", types=_RANKED)
    alpha: float = _f(8.0, "Alpha", "Scales the adapters by alpha / rank (network_alpha): alpha = rank gives scale "
                      "1; kohya's default 1 gives 1/rank and needs a higher learning rate. 0 means alpha = rank.",
                      types=_RANKED)
    factor: int = _f(-1, "LoKr factor", "LoKr: the size of the small Kronecker factor (it must divide every adapted "
                     "layer's widths); -1 picks the most balanced split per layer.", types=("lokr",),
                     advanced=True)
    full_matrix: bool = _f(False, "LoKr full matrix", "LoKr: train the larger factor whole instead of as a "
                           "low-rank pair (bigger file, no rank).", types=("lokr",), advanced=True)
    blocks: int = _f(64, "OFT blocks", "OFT: rotation blocks per layer; each adapted layer's width must divide by "
                     "it (more blocks = smaller, cheaper rotations).", types=("oft",), advanced=True)
    constraint: float = _f(0.0, "OFT constraint", "OFT: bound on how far each rotation may turn (COFT), times the "
                           "layer width; 0 = none.", types=("oft",), advanced=True)
    train_unet: bool = _f(True, "Train the UNet", "Adapters on the UNet's attention and projection layers.",
                           advanced=True)
    train_text_encoder: bool = _f(False, "Train the text encoder(s)", "Also adapt the text encoders' attention and "
                                  "MLP layers (both on SDXL); prompts are then encoded at every step.")
    text_encoder_lr_scale: float = _f(0.5, "Text encoder learning rate (x learning rate)", "The text encoder "
                                      "adapters' rate as a share of the learning rate (0.5 = half, kohya's usual "
                                      "1e-4 against 5e-5); it follows the schedule.", advanced=True)
    conv_rank: int = _f(0, "Conv rank (LoCon)", "Also adapt the UNet's residual blocks and samplers: their 3x3 "
                        "convolutions get this rank (conv_dim), their other layers the rank above; 0 = off.",
                        types=_CONV, advanced=True)
    conv_alpha: float = _f(0.0, "Conv alpha", "Alpha of the 3x3 convolution adapters (conv_alpha); 0 = conv rank.",
                           types=_CONV, advanced=True)
    dropout: float = _f(0.0, "Dropout", "Dropout on each adapter's rank values (network_dropout).", advanced=True,
                        types=("lora",))
    rank_dropout: float = _f(0.0, "Rank dropout", "Chance that a rank is dropped per sample (rank_dropout).",
                             advanced=True, types=("lora",))
    module_dropout: float = _f(0.0, "Module dropout", "Chance that a whole adapter is skipped at a step "
                               "(module_dropout).", advanced=True)
    continue_from: str = _f("", "Continue from LoRA", "An existing file of the chosen network type (path, or name in "
                            "the Lora folder) to keep training; its layers, ranks and alphas are kept. Empty starts "
                            "a new one.")
    instance_prompt: str = instance_prompt_field("")
    instance_token: str = instance_token_field("", "the LoRA's name")
    save_precision: str = _f("fp16", "Save precision", "dtype of the tensors in the file (save_precision).",
                             choices=tuple(SAVE_DTYPES), advanced=True)
    preview_multiplier: float = _f(1.0, "Preview strength", "The multiplier previews apply it with, as in "
                                   "<lora:NAME:multiplier>.", advanced=True)


@dataclass(frozen=True)
class LoraConfig(PriorPreservationSettings, LoraSettings):
    """Settings of a LoRA run: captioned-set mode, or DreamBooth mode with prior preservation on."""

    def validate(self) -> None:
        """Raise one ConfigError listing every invalid setting (the widths of the layers are checked with the
        model, when the network is built)."""
        problems = self.prior_problems() + self.type_problems()
        if self.rank < 1:
            problems.append(f"rank is {self.rank}; use 1 or more (4-32 is usual)")
        if self.conv_rank < 0:
            problems.append(f"conv_rank is {self.conv_rank}; use 0 (off) or more")
        for name in ("alpha", "conv_alpha"):
            if getattr(self, name) < 0:
                problems.append(f"{name} is {getattr(self, name)}; use 0 (= the rank) or a positive number")
        for name in ("dropout", "rank_dropout", "module_dropout"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name} is {getattr(self, name)}; use a value from 0 up to (not including) 1")
        if not (self.train_unet or self.train_text_encoder):
            problems.append("neither the UNet nor the text encoder is trained; turn on at least one of them")
        if self.conv_rank and not self.train_unet:
            problems.append(f"conv_rank is {self.conv_rank} but the UNet is not trained, and only the UNet has "
                            f"convolution layers; set conv_rank to 0 or train the UNet")
        if self.train_text_encoder and self.text_encoder_lr_scale <= 0:
            problems.append(f"text_encoder_lr_scale is {self.text_encoder_lr_scale}; use a positive share of the "
                            f"learning rate, or do not train the text encoder")
        if self.save_precision not in SAVE_DTYPES:
            problems.append(f"save_precision is {self.save_precision!r}; choose one of {', '.join(SAVE_DTYPES)}")
        if problems:
            raise ConfigError(problems)

    def type_problems(self) -> list[str]:
        """The network type, and settings that belong to other types (or DoRA where the type has no DoRA form)."""
        if self.network not in NETWORK_TYPES:
            return [f"network is {self.network!r}; choose one of {', '.join(NETWORK_TYPES)}"]
        kind = NETWORK_TYPES[self.network]
        problems = []
        for f in fields(LoraSettings):
            owners = f.metadata.get("types")
            if owners and self.network not in owners and getattr(self, f.name) != f.default:
                what = "has no DoRA form" if f.name == "dora" else f"does not use {f.name}"
                problems.append(f"{f.name} is {getattr(self, f.name)!r}, but the {kind.label} network {what} (it "
                                f"belongs to {', '.join(owners)}); remove it or choose one of those networks")
        if self.factor == 0 or self.factor < -1:
            problems.append(f"factor is {self.factor}; use -1 (automatic) or a positive factor such as 4 or 8")
        if self.blocks < 1:
            problems.append(f"blocks is {self.blocks}; use 1 or more (8 to 64 fit SD1, SD2 and SDXL)")
        if self.constraint < 0:
            problems.append(f"constraint is {self.constraint}; use 0 (none) or a positive bound")
        if self.train_text_encoder and "linear" not in kind.kinds:
            problems.append(f"the {kind.label} network adapts only the UNet's norm layers, and the text encoders have "
                            f"none it can adapt in the WebUI; turn off training of the text encoder(s)")
        return problems


class Lora(Method):
    """The Method for LoRA: the adapters are the only trainable parameters; the model is frozen (`trains` empty)."""

    name = "lora"

    def __init__(self, name: str, config: LoraConfig, network: LoraNetwork, base_model_version: str,
                 start_step: int = 0, notes: list[str] | None = None) -> None:
        self.output_name = name
        self.config = config
        self.base_model_version = base_model_version  # ss_base_model_version of the model it trains on
        self.network = network
        self._start_step = start_step
        self.notes = list(notes or [])
        self.caches_text = not self._trained("text_encoder")
        self.started_at = time.time()
        self._preview: tuple[int, Any] | None = None
        for adapter in network.by_name().values():
            adapter.requires_grad_(self._trained(adapter.target.module))
        network.train()

    def _trained(self, module: str) -> bool:
        return self.config.train_unet if module == "unet" else self.config.train_text_encoder

    @property
    def placeholder(self) -> str:
        return self.config.instance_token.strip() or self.output_name

    @property
    def start_step(self) -> int:
        return self._start_step

    def check(self, model: DiffusionModel) -> list[str]:
        check_class_sampler(self.config, model)
        return list(self.notes)

    def prepare(self, context: PrepareContext) -> None:
        generate_class_images(context, self.config)

    def trainable_parameters(self, model: DiffusionModel) -> list[ParamGroup]:
        groups: dict[str, list[torch.Tensor]] = {}
        for adapter in self.network.by_name().values():
            if self._trained(adapter.target.module):
                key = "unet" if adapter.target.module == "unet" else "text_encoder"
                groups.setdefault(key, []).extend(adapter.parameters())
        scales = {"unet": 1.0, "text_encoder": self.config.text_encoder_lr_scale}
        return [ParamGroup(f"lora_{key}", params, lr_scale=scales[key]) for key, params in groups.items()]

    def training_context(self, model: DiffusionModel) -> AbstractContextManager[Any]:
        """The adapters act for the whole run, so backward (and checkpointing's recomputation) sees them."""
        return self._applied(model)

    @contextmanager
    def _applied(self, model: DiffusionModel) -> Iterator[None]:
        # Adapters of a part that does not train (kept from a continued file) are not among the parameters the
        # loop moves to the device: move the whole network.
        self.network.to(model.device)
        with model.weight_adapters(self.network.by_name()):
            yield

    def loss(self, model: DiffusionModel, batch: TrainBatch) -> torch.Tensor:
        return self.objective(self.predict(model, batch), batch)

    def predict(self, model: DiffusionModel, batch: TrainBatch) -> torch.Tensor:
        """The UNet's prediction with the adapters applied (prompts encoded here when the text adapters train)."""
        cond = batch.cond
        if cond is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.caches_text):
                cond = model.encode_prompts(batch.prompts)
        return model.predict(batch.noisy_latents, batch.timesteps, cond, batch.size_cond)

    def objective(self, pred: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        """The loss of a prediction: the plain loss, or instance + λ · class loss when class images are paired."""
        return prior_loss(pred, batch, self.config.prior_loss_weight)

    def inference_extras(self) -> InferenceExtras:
        adapters: dict[str, WeightAdapter] = {name: _Preview(adapter, self.config.preview_multiplier)
                                              for name, adapter in self.network.by_name().items()}
        return InferenceExtras(adapters=adapters)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.network.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.network.load_state_dict(dict(state))

    def artifact_paths(self, directory: Path, stem: str) -> list[Path]:
        """The names the WebUI would list as this LoRA (any of its suffixes), and the card image written here."""
        names = [f"{stem}{suffix}" for suffix in (".safetensors", ".pt", ".ckpt", ".preview.png")]
        return [Path(directory) / name for name in names if (Path(directory) / name).is_file()]

    def preview_artifact(self, image: Any, directory: Path, stem: str, meta: ArtifactMeta) -> list[Path]:
        """Keep the latest preview: it becomes the card image (`NAME.preview.png`) of the file saved at its step
        and of the final file."""
        self._preview = (meta.step, image)
        return []

    def write_artifact(self, directory: Path, stem: str, meta: ArtifactMeta, overwrite: bool) -> list[Path]:
        path = Path(directory) / f"{stem}.safetensors"
        file = NetworkFile(self.network.modules_for_file(), self.metadata(meta, stem))
        written = [write_lora(file, path, overwrite, SAVE_DTYPES[self.config.save_precision])]
        if self._preview is not None and (stem == meta.name or self._preview[0] == meta.step):
            image = self._preview[1]
            card = Path(directory) / f"{stem}.preview.png"
            written.append(atomic_write(card, lambda tmp: image.save(tmp, format="PNG"), overwrite=True))
        return written

    def check_artifacts(self, model: DiffusionModel, paths: list[Path]) -> list[tuple[Path, NetworkCheck]]:
        """Each network file just written, loaded by the host's own loader on the model being trained."""
        return [(path, model.check_network_file(path)) for path in paths if path.suffix == ".safetensors"]

    def metadata(self, meta: ArtifactMeta, stem: str) -> dict[str, str]:
        """The `ss_*` keys kohya writes that the WebUI and other tools read (lora.md §4.7, §5.2), as strings."""
        train = dict(meta.settings.get("train", {}))
        adapters = self.network.by_name().values()
        ranks = sorted({a.rank for a in adapters if a.rank is not None})
        alphas = sorted({a.alpha for a in adapters if a.alpha is not None})
        values: dict[str, Any] = {
            "ss_output_name": stem, "ss_network_module": self._network_module(),
            "ss_network_dim": ranks[-1] if ranks else None,
            "ss_network_alpha": alphas[-1] if alphas else None,
            "ss_network_dropout": self.config.dropout or None, "ss_network_args": json.dumps(self._network_args()),
            "ss_base_model_version": self.base_model_version, "ss_v2": meta.family == "sd2",
            "ss_sd_model_name": meta.model.name, "ss_steps": meta.step, "ss_max_train_steps": train.get("steps"),
            "ss_learning_rate": train.get("learning_rate"), "ss_unet_lr": train.get("learning_rate"),
            "ss_text_encoder_lr": self._text_encoder_rate(train), "ss_optimizer": train.get("optimizer"),
            "ss_seed": train.get("seed"), "ss_mixed_precision": train.get("precision"),
            "ss_num_reg_images": self.config.class_images if self.config.prior_preservation else 0,
            "ss_noise_offset": train.get("noise_offset"), "ss_min_snr_gamma": train.get("min_snr_gamma"),
            "ss_training_started_at": self.started_at, "ss_training_finished_at": time.time(),
            "finetune_method": self.name, "finetune_model_hash": meta.model.shorthash,
        }
        if meta.dataset is not None:
            values.update(dataset_metadata(meta.dataset))
        return {key: str(value) for key, value in values.items()}

    def _plain(self) -> bool:
        """A plain kohya LoRA (networks.lora); anything else is written as LyCORIS writes it (lycoris.kohya)."""
        return all(a.kind.name == "lora" and not a.dora for a in self.network.by_name().values())

    def _network_module(self) -> str:
        return "networks.lora" if self._plain() else "lycoris.kohya"

    def _network_args(self) -> dict[str, str]:
        """kohya's network_args; for LyCORIS its `algo` and the type's own settings (`dora_wd`; DoRA magnitudes per
        input column, `wd_on_out` False, the form the WebUI v1.10.1 reads)."""
        config, kinds = self.config, self.network.kinds()
        conv_alpha = config.conv_alpha or config.conv_rank
        args: dict[str, Any] = {"conv_dim": config.conv_rank, "conv_alpha": conv_alpha if config.conv_rank else 0,
                                "rank_dropout": config.rank_dropout, "module_dropout": config.module_dropout}
        if not self._plain():
            args["algo"] = kinds[0].algo if kinds else NETWORK_TYPES[config.network].algo
        for f in fields(LoraSettings):
            owners = f.metadata.get("types", ())
            if owners and len(owners) == 1 and owners[0] == config.network:
                args[f.name] = getattr(config, f.name)
        written = {key: str(value) for key, value in args.items() if value is not False and value != 0}
        if any(a.dora for a in self.network.by_name().values()):  # said even where False: LyCORIS's default is True
            written.update(dora_wd="True", wd_on_out="False")
        return written

    def _text_encoder_rate(self, train: Mapping[str, Any]) -> str | None:
        if not self.config.train_text_encoder:
            return None
        rate = str(train.get("learning_rate"))
        try:  # a single rate is written as a number, as kohya does; a schedule as its share of it
            return f"{float(rate) * self.config.text_encoder_lr_scale:g}"
        except ValueError:
            return f"{self.config.text_encoder_lr_scale:g} x ({rate})"


def dataset_metadata(data: DatasetSummary) -> dict[str, Any]:
    """kohya's dataset keys, which the WebUI's Lora card shows: the tag list and its random prompt (tag frequency),
    "Dataset size" (folders), "Resolution(s)" (buckets, `[width, height]` each)."""
    sizes = sorted(data.sizes.items())
    buckets = {str(i): {"resolution": list(size), "count": count} for i, (size, count) in enumerate(sizes)}
    return {"ss_num_train_images": data.total_images * data.repeats, "ss_resolution": str(data.resolution),
            "ss_enable_bucket": data.buckets, "ss_tag_frequency": json.dumps(data.tags),
            "ss_dataset_dirs": json.dumps({name: {"n_repeats": data.repeats, "img_count": count}
                                           for name, count in data.images.items()}),
            "ss_bucket_info": json.dumps({"buckets": buckets})}


class _Preview:
    """An adapter as previews use it: no dropout, at the preview multiplier."""

    def __init__(self, adapter: NetworkAdapter, multiplier: float) -> None:
        self.adapter, self.multiplier = adapter, multiplier

    def _run(self, call: Any) -> torch.Tensor:
        adapter = self.adapter
        was_training, saved = adapter.training, adapter.multiplier
        adapter.train(False)
        adapter.multiplier = self.multiplier
        try:
            return call()
        finally:
            adapter.train(was_training)
            adapter.multiplier = saved

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._run(lambda: self.adapter(x, weight))

    def weight_delta(self, weight: torch.Tensor) -> torch.Tensor:
        return self._run(lambda: self.adapter.weight_delta(weight))


def build(model: DiffusionModel, name: str, config: LoraConfig, directory: Path, seed: int) -> Lora:
    """The registry's constructor: a new network seeded by the run seed, or the one in a file to continue."""
    network, start_step, notes = build_network(model, config, directory, seed)
    version = base_version(model.family, model.prediction_type == V_PREDICTION)
    return Lora(name, config, network, version, start_step, notes)


def training_data(config: LoraConfig, data: DatasetConfig, name: str) -> Any:
    """`MethodSpec.data`: the images under the instance prompt or the template, `[name]` the instance token or the
    LoRA's name; paired with class images in DreamBooth mode."""
    return paired_images(config, data, instance_lines(config), config.instance_token.strip() or name)


def memory_needs(model: DiffusionModel, config: LoraConfig) -> MemoryNeeds:
    """The values of every module the settings make (the type's shapes; DoRA adds a magnitude per input column);
    for the disk checks."""
    kind = NETWORK_TYPES[config.network]
    total = 0
    for target, shape, _ in requested_targets(model.adapter_targets(), config):
        layer = layer_of(target)
        total += sum(math.prod(size) for size in kind.shapes(layer, shape).values())
        total += layer.in_features if config.dora else 0
    return MemoryNeeds(total)


class LoraSpec(MethodSpec):
    """LoRA as hosts see it."""

    key = Lora.name
    label = "LoRA"
    description = "Low-rank adapters on the UNet (and optionally the text encoders); the file <lora:NAME:1> loads."
    config_type = LoraConfig
    output_kind = "loras"
    log_folder = "lora"
    data_defaults = {"template": "filewords.txt"}
    train_defaults = {"learning_rate": "0.0001"}
    name_help = "The LoRA's file name; the WebUI applies it with <lora:NAME:1> in a prompt."

    def build(self, model: DiffusionModel, name: str, config: LoraConfig, directory: Path, seed: int) -> Lora:
        return build(model, name, config, directory, seed)

    def memory(self, model: DiffusionModel, config: LoraConfig) -> MemoryNeeds:
        return memory_needs(model, config)

    def data(self, config: LoraConfig, data: DatasetConfig, name: str) -> TrainingData:
        return training_data(config, data, name)

    def resolve(self, config: LoraConfig, data: DatasetConfig, method_folder: Path) -> LoraConfig:
        return resolve_class_folder(config, data, method_folder)

    def pairs_class_images(self, config: LoraConfig) -> bool:
        return config.prior_preservation

    def continue_from(self, config: LoraConfig) -> str:
        return config.continue_from


METHOD = LoraSpec()
