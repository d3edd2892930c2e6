"""Run folder files: state round trip, loss CSV rows, truncation after a crash."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune_core.errors import ArtifactError
from finetune_core.train.run_folder import LossRow, RunFolder


def test_state_round_trip(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "r")
    assert not run.has_state()
    with pytest.raises(ArtifactError, match="no resume state"):
        run.load_state()
    run.save_state({"params": [torch.arange(3.0)], "counters": {"step": 4}}, {"steps": 9})
    state, config = run.load_state()
    assert torch.equal(state["params"][0], torch.arange(3.0)) and state["counters"]["step"] == 4
    assert config == {"steps": 9}
    assert not list((tmp_path / "r" / "state").glob("*.tmp"))


def test_loss_rows_append_and_truncate(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "r")
    for step in (2, 4, 6):
        run.append_loss_row(LossRow(step, 0, step, 0.5 / step, 1e-3))
    assert [r.step for r in run.loss_rows()] == [2, 4, 6]
    assert run.loss_rows()[1].loss == pytest.approx(0.125)
    run.truncate_loss_rows(4)
    assert [r.step for r in run.loss_rows()] == [2, 4]
    assert run.csv_path.read_text().startswith("step,epoch,epoch_step,loss,learn_rate\n")
