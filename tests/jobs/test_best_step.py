"""Picking a step (issue 23): the comparison grid, the suggested step, "use this copy", and their bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune_core.errors import ConfigError
from finetune_core.jobs import best_step, compare, service
from finetune_core.model.tiny import build_tiny
from finetune_core.train.run_folder import LossRow, RunFolder
from tests.conftest import EXAMPLES

PROMPT = "a picture of pickword"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny TI run: copies and previews at steps 2, 4 and 6 (the preview prompt fixed), validation every 2."""
    root = tmp_path_factory.mktemp("pick")
    shutil.copytree(EXAMPLES, root / "data")
    (root / "t.txt").write_text("a picture of [name], [filewords]\n")
    request = service.TrainRequest(
        "textual-inversion", "pickword", {"init_text": "ball"},
        {"data_dir": str(root / "data"), "template": str(root / "t.txt"), "width": 64, "height": 64},
        {"steps": 6, "learning_rate": "0.05", "save_every": 2, "preview_every": 2, "preview_steps": 4,
         "preview_prompt": PROMPT, "csv_every": 0, "validation_every": 2, "seed": 1}, overwrite=True)
    result = service.train(request, build_tiny("tiny-sd1"), service.OutputFolders.standalone(root / "out"))
    assert result.run_dir is not None
    return result.run_dir


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_the_grid_has_one_labelled_cell_per_copy_prompt_and_seed_made_with_that_copy(run, tmp_path):
    prompts, seeds = [PROMPT, "pickword on the grass"], [compare.default_seed(best_step.run_info(run)), 7]
    grid = compare.compare(run, build_tiny("tiny-sd1"), prompts, seeds, tmp_path / "grid.png")
    assert grid.steps == [2, 4, 6]
    assert sorted((c.step, c.prompt, c.seed) for c in grid.cells) == sorted(
        (s, p, d) for s in (2, 4, 6) for p in prompts for d in seeds)
    # made with the copy: the run's preview of step 4 (its prompt, its seed) is the grid's cell of step 4
    preview = Image.open(run / "images" / "pickword-4.png")
    cell = next(c for c in grid.cells if (c.step, c.prompt, c.seed) == (4, PROMPT, seeds[0]))
    assert np.array_equal(_pixels(cell.image), _pixels(preview))
    # copies that differ give different cells
    same_row = [c for c in grid.cells if (c.prompt, c.seed) == (PROMPT, 7)]
    assert not np.array_equal(_pixels(same_row[0].image), _pixels(same_row[-1].image))
    picture = Image.open(grid.path)
    w, h = cell.image.size
    assert picture.size == (compare.LABEL_WIDTH + 3 * w, compare.LABEL_HEIGHT + 4 * h)
    parameters = json.loads(picture.text["parameters"])
    assert parameters["steps"] == [2, 4, 6] and parameters["prompts"] == prompts and parameters["seeds"] == seeds
    assert parameters["suggested_step"] == grid.suggested


def test_the_default_prompts_are_the_preview_prompt_and_two_captions(run):
    prompts = compare.default_prompts(best_step.run_info(run))
    assert prompts[0] == PROMPT and len(prompts) == 3
    assert all("pickword" in p for p in prompts[1:]) and prompts[1] != prompts[2]


def _with_losses(run: Path, tmp_path: Path, losses: dict[int, float]) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    rows = [LossRow(step, 0, step, 1.0, 0.05, losses.get(step)) for step in range(1, 7)]
    folder = RunFolder(copy)
    folder.csv_path.unlink()
    for row in rows:
        folder.append_loss_row(row)
    return copy


def test_the_suggested_step_is_the_copy_with_the_lowest_smoothed_validation_loss(run, tmp_path):
    info = best_step.run_info(run)
    series = best_step.validation_series(info)
    assert [s for s, _ in series] == [2, 4, 6]
    smooth = best_step.smoothed(series)
    suggestion = best_step.suggest_step(info)
    assert suggestion is not None and suggestion.smoothed == min(smooth.values())
    # a single dip between two poor evaluations is not picked; a steady low is
    dip = _with_losses(run, tmp_path, {1: 3.0, 2: 1.0, 3: 3.0, 4: 2.0, 5: 2.1, 6: 2.2})
    picked = best_step.suggest_step(best_step.run_info(dip))
    assert picked is not None and picked.step == 4 and picked.smoothed == 2.1


def test_use_writes_the_copy_under_the_artefact_name_and_keeps_numbered_backups(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    info = best_step.run_info(copy)
    final = info.final_dir / "pickword.pt"
    before = final.read_bytes()
    step, written, backups = best_step.use_copy(copy, 2)
    assert step == 2 and written == [final]
    assert final.read_bytes() == (copy / "artifacts" / "pickword-2.pt").read_bytes()
    assert backups == [final.with_name("pickword.pt.1.bak")] and backups[0].read_bytes() == before
    _step, _written, again = best_step.use_copy(copy, 4)
    assert again == [final.with_name("pickword.pt.2.bak")]
    with pytest.raises(ConfigError, match="no copy saved at step 3"):
        best_step.use_copy(copy, 3)


def test_compare_refuses_a_folder_that_is_no_run_or_has_no_copies(run, tmp_path, capsys):
    from finetune_core.cli import main
    with pytest.raises(ConfigError, match="not a run folder"):
        compare.check_compare(tmp_path)
    empty = tmp_path / "run"
    shutil.copytree(run, empty)
    shutil.rmtree(empty / "artifacts")
    with pytest.raises(ConfigError, match="no saved copies"):
        compare.check_compare(empty)
    assert main(["compare", str(empty)]) == 2
    assert "no saved copies" in capsys.readouterr().err
    assert main(["use", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_rest_routes_suggest_compare_and_use_and_refuse_while_a_job_trains(run, tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from finetune_core.hosts.job_runner import JobRunner, JobState
    from finetune_core.hosts.standalone import StandaloneHost
    from finetune_core.ui.api import mount_api
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    host = StandaloneHost(tmp_path / "out", "tiny-sd1", loader=lambda spec: build_tiny(spec))
    runner = JobRunner(host)
    app = FastAPI()
    mount_api(app, host, runner)
    client = TestClient(app)
    suggested = client.post("/finetune/v1/suggest", json={"run_dir": str(copy)}).json()
    assert suggested["steps"] == [2, 4, 6] and suggested["suggested_step"] in (2, 4, 6)
    grid = client.post("/finetune/v1/compare", json={"run_dir": str(copy), "prompts": [PROMPT], "seeds": [3]})
    assert grid.status_code == 200 and Path(grid.json()["path"]).is_file()
    used = client.post("/finetune/v1/use", json={"run_dir": str(copy), "step": 4}).json()
    assert used["step"] == 4 and used["backups"]
    for body in ({"run_dir": str(tmp_path)}, {"run_dir": str(copy), "seeds": ["x"]}, {"run_dir": str(copy),
                                                                                      "prompts": []}):
        refused = client.post("/finetune/v1/compare", json=body)
        assert refused.status_code == 400 and refused.json()["detail"]
    runner._state = JobState(method="lora", name="other", status="running", step=3, total=10)
    busy = client.post("/finetune/v1/compare", json={"run_dir": str(copy)})
    assert busy.status_code == 409 and "in use by a training job" in busy.json()["detail"]
