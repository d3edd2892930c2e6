"""TrainConfig: defaults, validation that gathers every problem, form metadata, versioned loading."""

from __future__ import annotations

import dataclasses

import pytest

from finetune_core.errors import ConfigError
from finetune_core.train.train_config import CONFIG_VERSION, TrainConfig, config_fields, config_from_dict


def test_defaults_are_valid_and_match_the_webui() -> None:
    config = TrainConfig()
    config.validate()
    assert (config.steps, config.save_every, config.preview_every, config.csv_every) == (100000, 500, 500, 500)
    assert config.clip_grad_value == "0.1" and config.optimizer == "adamw"


def test_every_field_has_a_label_and_help() -> None:
    for f in config_fields():
        assert f.metadata["label"] and "help" in f.metadata
    choices = {f.name: f.metadata.get("choices") for f in config_fields()}
    assert choices["precision"] == ["fp32", "fp16", "bf16"]
    assert "adamw8bit" in choices["optimizer"]


@pytest.mark.parametrize("steps", [0, -5])
def test_steps_must_be_positive(steps: int) -> None:
    with pytest.raises(ConfigError, match="more than 0"):
        TrainConfig(steps=steps).validate()


def test_all_problems_are_gathered_into_one_error() -> None:
    config = TrainConfig(learning_rate="fast", optimizer="adafactor", gradient_accumulation=0, precision="fp8",
                         clip_grad_mode="norm", clip_grad_value="x", save_every=-1, seed=-2, preview_width=100)
    with pytest.raises(ConfigError) as info:
        config.validate()
    text = str(info.value)
    for needle in ("Invalid learning rate schedule", "adafactor", "gradient_accumulation", "fp8",
                   "Invalid clip value schedule", "save_every", "seed", "preview_width"):
        assert needle in text
    assert len(info.value.problems) >= 8
    assert config.learning_rate == "fast"  # unchanged


def test_wrong_types_are_reported() -> None:
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig(learning_rate=0.005).validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="steps"):
        TrainConfig(steps=True).validate()


def test_round_trip_and_migration_from_webui_names() -> None:
    config = TrainConfig(steps=10, learning_rate="0.1:5, 0.01", weight_decay=0.0)
    assert config_from_dict(config.to_dict()) == config
    old = {"learn_rate": "0.02", "gradient_step": 4, "create_image_every": 7, "save_embedding_every": 9}
    migrated = config_from_dict(old)
    assert (migrated.learning_rate, migrated.gradient_accumulation, migrated.preview_every, migrated.save_every) == \
        ("0.02", 4, 7, 9)
    assert migrated.version == CONFIG_VERSION


def test_unknown_keys_and_future_versions_are_refused() -> None:
    with pytest.raises(ConfigError, match="lern_rate"):
        config_from_dict({"version": CONFIG_VERSION, "lern_rate": "0.1"})
    with pytest.raises(ConfigError, match="version 99"):
        config_from_dict({"version": 99})


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().steps = 5  # type: ignore[misc]


def test_optimizers_whose_package_is_missing_are_not_offered(monkeypatch):
    """The forms and the CLI's help list only installed optimizers and name the others with what to install."""
    import argparse

    from finetune_core.cli import add_settings_flags
    from finetune_core.train.train_config import OPTIONAL_OPTIMIZERS, TrainConfig
    from finetune_core.ui.schema import field_specs

    monkeypatch.setitem(OPTIONAL_OPTIMIZERS, "lion", ("finetune_core_no_such_package", "Lion", "lion-pytorch"))
    spec = next(s for s in field_specs(TrainConfig) if s.name == "optimizer")
    assert "lion" not in spec.choices and "adamw" in spec.choices
    assert "Not installed here:" in spec.help and "lion (pip install lion-pytorch)" in spec.help
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, "train", TrainConfig, set())
    text = parser.format_help().replace("\n", " ")
    assert "lion (pip install lion-pytorch)" in " ".join(text.split())
