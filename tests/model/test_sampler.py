"""Sampler schedules and option checks (images themselves are checked in the contract suite)."""

from __future__ import annotations

import pytest

from finetune_core.errors import ConfigError
from finetune_core.model.sampler import SampleOptions, ddim_timesteps, euler_timesteps, sample


def test_ddim_timesteps_like_ldm() -> None:
    steps = ddim_timesteps(20)
    assert steps[0] == 951 and steps[-1] == 1 and len(steps) == 20 and steps == sorted(steps, reverse=True)
    assert max(ddim_timesteps(1000)) == 999


def test_euler_timesteps() -> None:
    assert euler_timesteps(4) == [999, 666, 333, 0]


def test_options_name_every_problem() -> None:
    with pytest.raises(ConfigError) as error:
        SampleOptions(steps=0, width=100, sampler="plms").validate()
    assert len(error.value.problems) == 3 and "multiples of 8" in str(error.value)


class _Stub:
    vae_scale = 8


def test_negative_prompt_count_must_match() -> None:
    with pytest.raises(ConfigError, match="negative prompts"):
        sample(_Stub(), ["a", "b"], ["only one"], width=64, height=64)  # type: ignore[arg-type]
