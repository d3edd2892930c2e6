"""The WebUI learning-rate schedule syntax (`learn_schedule.py`)."""

from __future__ import annotations

import pytest

from finetune_core.errors import ConfigError
from finetune_core.train.lr_schedule import end_step, parse_schedule, rate_at, value_at


def test_pairs_and_a_bare_final_rate() -> None:
    schedule = parse_schedule("0.005:100, 1e-3:1000, 1e-5", 5000)
    assert schedule == [(0.005, 100), (1e-3, 1000), (1e-5, 5000)]
    assert [rate_at(schedule, s) for s in (0, 99, 100, 999, 1000, 4999)] == [0.005, 0.005, 1e-3, 1e-3, 1e-5, 1e-5]
    assert rate_at(schedule, 5000) is None and end_step(schedule) == 5000


def test_training_stops_when_the_schedule_runs_out() -> None:
    schedule = parse_schedule("0.005:100, 1e-3:1000", 100000)
    assert end_step(schedule) == 1000
    assert rate_at(schedule, 999) == 1e-3 and rate_at(schedule, 1000) is None


def test_minus_one_means_until_max_steps_and_ends_the_list() -> None:
    assert parse_schedule("0.1:10, 0.01:-1, 0.5:99999", 300) == [(0.1, 10), (0.01, 300)]


def test_a_step_past_max_steps_is_cut_and_ends_the_list() -> None:
    assert parse_schedule("0.1:10, 0.01:500, 0.001:900", 200) == [(0.1, 10), (0.01, 200)]


def test_a_single_rate_and_empty_parts() -> None:
    assert parse_schedule(" 0.005 ", 100) == [(0.005, 100)]
    assert parse_schedule("0.1:10,, 0.2 ,", 50) == [(0.1, 10), (0.2, 50)]


def test_resuming_mid_schedule_picks_the_segment_of_the_step() -> None:
    schedule = parse_schedule("0.05:10, 0.02:20, 0.01:60, 0.005", 100)
    assert rate_at(schedule, 15) == 0.02 and rate_at(schedule, 60) == 0.005


@pytest.mark.parametrize(("text", "part"), [
    ("abc", "'abc'"), ("0.1:ten", "'0.1:ten'"), ("0.1:1e3", "'0.1:1e3'"), ("0.1:5, x:9", "'x:9'"),
    ("0.1:2:3", "'0.1:2:3'"), ("-0.1", "'-0.1'"), ("0.1:-5", "'0.1:-5'"), ("nan", "'nan'"), ("0.1, oops", "'oops'"),
])
def test_invalid_schedules_name_the_bad_part(text: str, part: str) -> None:
    with pytest.raises(ConfigError, match="Invalid learning rate schedule") as info:
        parse_schedule(text, 100)
    assert part in str(info.value)


def test_empty_or_non_text_schedules_are_invalid() -> None:
    with pytest.raises(ConfigError, match="no rate"):
        parse_schedule(" , ", 100)
    with pytest.raises(ConfigError, match="must be text"):
        parse_schedule(0.005, 100)  # type: ignore[arg-type]


def test_clip_values_hold_their_last_value() -> None:
    schedule = parse_schedule("0.5:10, 0.1:20", 100, what="clip value")
    assert value_at(schedule, 5) == 0.5 and value_at(schedule, 15) == 0.1 and value_at(schedule, 50) == 0.1
