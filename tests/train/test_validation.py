"""The validation loss and the early stop (issue 23) on the tiny model, through the service every host calls."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_core.errors import ConfigError, DatasetError
from finetune_core.jobs import service
from finetune_core.model.tiny import build_tiny
from finetune_core.train import loop
from finetune_core.train.events import ValidationEvent, Warning_
from finetune_core.train.run_folder import RunFolder
from tests.conftest import EXAMPLES

DATA = {"width": 64, "height": 64, "batch_size": 2, "template": "", "resize_mode": "fixed"}
TRAIN = {"steps": 4, "preview_every": 0, "save_every": 2, "seed": 5, "csv_every": 0, "learning_rate": "0.05"}


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    shutil.copytree(EXAMPLES, tmp_path / "data")
    template = tmp_path / "t.txt"
    template.write_text("a picture of [name], [filewords]\n")
    return tmp_path / "data"


def _request(data: Path, name: str = "vword", train: dict[str, Any] | None = None,
             extra_data: dict[str, Any] | None = None) -> service.TrainRequest:
    return service.TrainRequest("textual-inversion", name, {"init_text": "ball"},
                                {**DATA, "data_dir": str(data), "template": str(data.parent / "t.txt"),
                                 **(extra_data or {})},
                                {**TRAIN, **(train or {})}, overwrite=True)


def _train(data: Path, out: Path, **kwargs: Any) -> tuple[service.JobResult, list[Any]]:
    events: list[Any] = []
    result = service.train(_request(data, **kwargs), build_tiny("tiny-sd1"), service.OutputFolders.standalone(out),
                           on_event=events.append)
    return result, events


def _validation(run_dir: Path | None) -> dict[int, float]:
    assert run_dir is not None
    return {r.step: r.validation_loss for r in RunFolder(run_dir).loss_rows() if r.validation_loss is not None}


def test_the_same_weights_give_the_same_validation_loss_at_any_step(dataset, tmp_path, monkeypatch):
    """Steps whose update is skipped keep the weights: every evaluation (steps 1..4) is the same number, to the bit;
    with the updates the weights move and the loss moves with them (so the equality is not a constant)."""
    from finetune_core.train import step
    with monkeypatch.context() as patch:
        patch.setattr(step, "apply_update", lambda ctx, at: (True, ""))  # gradients computed, never applied
        _result, events = _train(dataset, tmp_path / "still", train={"validation_every": 1})
    losses = [e.loss for e in events if isinstance(e, ValidationEvent)]
    assert len(losses) == 4 and len(set(losses)) == 1
    _result, events = _train(dataset, tmp_path / "moving", train={"validation_every": 1})
    moving = [e.loss for e in events if isinstance(e, ValidationEvent)]
    assert moving[0] != losses[0] and len(set(moving)) == 4


def test_the_validation_loss_changes_nothing_in_training_and_lands_in_the_csv(dataset, tmp_path):
    plain, _ = _train(dataset, tmp_path / "plain")
    validated, events = _train(dataset, tmp_path / "validated", train={"validation_every": 3})
    a = torch.load(plain.artifacts[0], weights_only=False)["string_to_param"]["*"]
    b = torch.load(validated.artifacts[0], weights_only=False)["string_to_param"]["*"]
    assert torch.equal(a, b)
    # every 3 steps and at every save (2, 4): steps 2, 3 and 4, also as rows of the CSV
    assert sorted(_validation(validated.run_dir)) == [2, 3, 4]
    assert [e.step for e in events if isinstance(e, ValidationEvent)] == [2, 3, 4]


def test_a_held_out_image_is_never_trained_on(dataset, tmp_path):
    from finetune_core.data.dataset import ImageDataset
    from finetune_core.data.dataset_config import DatasetConfig
    config = DatasetConfig(**{**DATA, "data_dir": str(dataset), "template": "none.txt", "validation_split": 2})
    train, held = ImageDataset(config), ImageDataset(DatasetConfig(**{**config.__dict__, "held_out": True}))
    names = {r.path.name for r in train.records}
    held_names = {r.path.name for r in held.records}
    assert len(held_names) == 2 and not names & held_names
    assert len(names) + 2 == len(list(dataset.glob("*.png")))


def test_early_stop_stops_after_patience_evaluations_without_a_new_best(dataset, tmp_path, monkeypatch):
    """Evaluations 5, 4, 4.5, 4.2, ...: the best is at step 2; two more without a new best stop the run at step 4
    and the final file is written as at the end of a run."""
    values = iter([5.0, 4.0, 4.5, 4.2, 3.0, 2.0])
    monkeypatch.setattr(loop, "validation_loss", lambda ctx, data: next(values))
    result, events = _train(dataset, tmp_path, train={"steps": 6, "validation_every": 1, "early_stop_patience": 2})
    assert result.step == 4 and not result.interrupted and result.artifacts
    warning = [e.message for e in events if isinstance(e, Warning_) and "stopped early" in e.message]
    assert warning and "at step 2" in warning[0]
    last = [e for e in events if isinstance(e, ValidationEvent)][-1]
    assert (last.best_step, last.best_loss) == (2, 4.0)


@pytest.mark.parametrize(("train", "data", "error", "words"), [
    ({"validation_every": 0}, {}, ConfigError, "validation_every must be 1 or more"),
    ({"validation_every": -3}, {}, ConfigError, "validation_every must be 1 or more"),
    ({"early_stop_patience": 2}, {}, ConfigError, "needs the validation loss"),
    ({}, {"validation_split": 2}, ConfigError, "the validation loss is off"),
    ({"validation_every": 2}, {"validation_split": 6}, DatasetError, "validation_split 6 is too large"),
    ({"validation_every": 2}, {"validation_dir": "EMPTY"}, DatasetError, "EMPTY"),
])
def test_bad_validation_settings_are_refused_before_anything_starts(dataset, tmp_path, train, data, error, words):
    if data.get("validation_dir") == "EMPTY":
        (tmp_path / "EMPTY").mkdir()
        (tmp_path / "EMPTY" / "notes.txt").write_text("no images here")
        data = {"validation_dir": str(tmp_path / "EMPTY")}
    folders = service.OutputFolders.standalone(tmp_path / "out")
    with pytest.raises(error, match=words):
        service.validate_request(_request(dataset, train=train, extra_data=data), folders)
    assert not (tmp_path / "out").exists()


def test_the_cli_says_a_bad_validation_setting_and_exits_2(dataset, tmp_path, capsys):
    from finetune_core.cli import main
    code = main(["train", "textual-inversion", "--model", "tiny-sd1", "--name", "w", "--data-dir", str(dataset),
                 "--output-dir", str(tmp_path / "out"), "--validation-every", "0"])
    assert code == 2
    assert "validation_every must be 1 or more" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_console_prints_each_validation_loss():
    import io

    from finetune_core.hosts.console import ConsoleProgress
    stream = io.StringIO()
    with ConsoleProgress(stream, echo=False) as progress:
        progress(ValidationEvent(4, 0.1234567, 0.1, 2))
    assert "validation loss at step 4: 0.123457 (best 0.1 at step 2)" in stream.getvalue()


@pytest.mark.parametrize("method", ["hypernetwork", "lora", "dreambooth", "dreamartist"])
def test_every_method_evaluates_its_own_validation_loss(method, dataset, tmp_path):
    from finetune_core.methods import METHODS
    settings = {"dreamartist": {"init_text": "ball"}}.get(method, {})
    request = service.TrainRequest(method, f"v{method}", settings,
                                   {**DATA, "data_dir": str(dataset), "template": str(dataset.parent / "t.txt"),
                                    "validation_split": 2},
                                   {**TRAIN, "steps": 2, "save_every": 0, "validation_every": 1,
                                    "learning_rate": str(METHODS[method].train_defaults.get("learning_rate",
                                                                                           "1e-4"))},
                                   overwrite=True)
    events: list[Any] = []
    service.train(request, build_tiny("tiny-sd1"), service.OutputFolders.standalone(tmp_path / "out"),
                  on_event=events.append)
    losses = [e.loss for e in events if isinstance(e, ValidationEvent)]
    assert len(losses) == 2 and all(0 < loss < 100 for loss in losses)
