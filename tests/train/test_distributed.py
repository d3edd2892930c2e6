"""Data-parallel training (issue 15): 2 CPU processes over gloo, started as `accelerate launch` would start them.

Tolerances: two processes each backpropagate the mean loss of their slice of the global batch, weighted by its share,
and the gradients are summed by the all-reduce; one process backpropagates the mean over the whole batch. The two
differ only in the order of the float32 additions (per-slice sums, then the all-reduce's sum, against one sum):
about 1e-7 of the gradient's size per step. TI trains with its default AdamW: after 4 steps at lr 0.005 the largest
difference seen is 9e-7 on weights the steps moved by 2e-2, so 1e-5 absolute (+1e-4 relative) leaves a 10x margin.
LoRA trains with SGD here: its `up` matrices start at zero, so the first gradients of its `down` matrices are tiny,
and Adam (which divides each gradient element by its own running RMS) turns the rounding noise of a near-zero
element into a full +-lr step, a difference no tolerance below lr can accept; SGD's update is linear in the
gradient, so the artefacts compare the summed gradients themselves (largest difference seen: 1e-7). Each test also
checks that the last two steps moved the weights by more than 100x the tolerance, so a dropped gradient, a wrong
slice or a missing loss weight cannot pass.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from finetune_core.jobs import service
from finetune_core.model.tiny import build_tiny
from finetune_core.train.distributed import Processes, shard_bounds, slice_batch
from tests.conftest import EXAMPLES
from tests.train.distributed_worker import request_of, worker

RTOL, ATOL = 1e-4, 1e-5
STEPS = 4
# batch 3 over 7 images: micro-batches of 3, 3 and 1 samples, so the slices are 2 + 1 and then 1 + 0 (empty)
DATA = {"width": 64, "height": 64, "batch_size": 3, "template": "", "resize_mode": "fixed"}
TRAIN = {"steps": STEPS, "preview_every": 0, "save_every": STEPS // 2, "seed": 3, "csv_every": 1}
JOBS = {
    "ti": {"method": "textual-inversion", "name": "dpword", "template": "a picture of [name], [filewords]\n",
           "method_settings": {"init_text": "ball", "num_vectors": 2}},
    # no [name] in LoRA's prompts: the interrupted run has another name, and must see the same prompts
    "lora": {"method": "lora", "name": "dplora", "template": "a picture of [filewords]\n",
             "method_settings": {"rank": 4, "alpha": 4, "save_precision": "fp32"},
             "train": {"optimizer": "sgd", "learning_rate": "1.0"}},
}


def _jobs(data: Path) -> list[dict[str, Any]]:
    jobs = []
    for key, base in JOBS.items():
        template = data.parent / f"{key}.txt"
        template.write_text(base["template"])
        job = {**base, "data": {**DATA, "data_dir": str(data), "template": str(template)},
               "train": {**TRAIN, **base.get("train", {})}}
        jobs.append({**job, "key": key})
        jobs.append({**job, "key": f"{key}-cut", "name": f"{base['name']}-cut", "interrupt_at": 2})
        jobs.append({**job, "key": f"{key}-resumed", "name": f"{base['name']}-cut", "resume": f"{key}-cut"})
    # two micro-batches a step: the gradients are summed once, after the second backward
    lora = next(j for j in jobs if j["key"] == "lora")
    jobs.append({**lora, "key": "lora-accumulated", "name": "dplora-acc",
                 "train": {**lora["train"], "gradient_accumulation": 2}})
    # the validation loss (issue 23) on 2 held-out images: each process evaluates its slice of each batch
    ti = next(j for j in jobs if j["key"] == "ti")
    jobs.append({**ti, "key": "ti-validated", "name": "dpword-val", "data": {**ti["data"], "validation_split": 2},
                 "train": {**ti["train"], "validation_every": 1}})
    return jobs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dpdata")
    shutil.copytree(EXAMPLES, root / "data")
    return root / "data"


@pytest.fixture(scope="module")
def two_processes(dataset, tmp_path_factory) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every 2-process job in one launch (the start-up is the slow part): uninterrupted, interrupted, resumed."""
    out = tmp_path_factory.mktemp("dp2")
    jobs = _jobs(dataset)
    mp.start_processes(worker, args=(2, _free_port(), jobs, str(out)), nprocs=2, join=True, start_method="spawn")
    return json.loads((out / "results.json").read_text()), jobs


def _single(job: dict[str, Any], out: Path) -> list[Path]:
    folders = service.OutputFolders.standalone(out)
    result = service.train(request_of(job), build_tiny("tiny-sd1"), folders, processes=Processes())
    return list(result.artifacts)


def _tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    return {"emb": torch.load(path, weights_only=False)["string_to_param"]["*"]}


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=RTOL, atol=ATOL, msg=key)


@pytest.mark.parametrize("key", ["ti", "lora", "lora-accumulated"])
def test_two_processes_train_what_one_process_trains_with_the_same_global_batch(key, two_processes, tmp_path):
    results, jobs = two_processes
    job = next(j for j in jobs if j["key"] == key)
    two = _tensors(results[key]["artifacts"][0])
    one = _tensors(_single(job, tmp_path)[0])
    _assert_close(two, one)
    halfway = _tensors(Path(results[key]["run_dir"]) / "artifacts" / Path(results[key]["artifacts"][0]).name.replace(
        ".", f"-{STEPS // 2}.", 1))
    moved = max(float((two[k].float() - halfway[k].float()).abs().max()) for k in two)
    assert moved > 100 * ATOL, "the last steps must move the weights far past the tolerance"
    if key.startswith("lora"):  # its gradients fill many small buckets: most are summed during the backward
        assert results[key]["overlapped"] > STEPS


@pytest.mark.parametrize("key", ["ti", "lora"])
def test_two_processes_interrupted_and_resumed_equal_two_processes_uninterrupted(key, two_processes):
    results, _jobs = two_processes
    cut, resumed = results[f"{key}-cut"], results[f"{key}-resumed"]
    assert cut["interrupted"] and cut["step"] == 2
    assert resumed["step"] == STEPS and not resumed["interrupted"]
    uninterrupted = _tensors(results[key]["artifacts"][0])
    for name, value in _tensors(resumed["artifacts"][0]).items():  # the same steps, the same state: exactly equal
        assert torch.equal(value, uninterrupted[name]), name
    rows = (Path(resumed["run_dir"]) / "loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(s) for s in range(1, STEPS + 1)]  # one writer, no gaps


def test_two_processes_evaluate_the_validation_loss_one_process_evaluates(two_processes, tmp_path):
    """Batch 3 over 2 held-out images: one batch of 2, a slice of 1 per process, weighted by its share; equal to the
    one-process loss up to the order of the float additions."""
    from finetune_core.train.run_folder import RunFolder
    results, jobs = two_processes
    job = next(j for j in jobs if j["key"] == "ti-validated")
    one_run = service.train(request_of(job), build_tiny("tiny-sd1"), service.OutputFolders.standalone(tmp_path),
                            processes=Processes()).run_dir
    two = [r.validation_loss for r in RunFolder(results["ti-validated"]["run_dir"]).loss_rows()]
    one = [r.validation_loss for r in RunFolder(one_run).loss_rows()]
    assert len(one) == STEPS and None not in one and len(set(one)) == STEPS
    assert two == pytest.approx(one, rel=1e-6)


def test_slices_cover_the_batch_once_in_order():
    for size in range(0, 8):
        bounds = [shard_bounds(size, rank, 3) for rank in range(3)]
        assert bounds[0][0] == 0 and bounds[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1


def test_a_slice_cuts_every_per_sample_field():
    from finetune_core.data.data_batch import DataBatch
    batch = DataBatch(torch.arange(5.0).view(5, 1, 1, 1), list("abcde"), torch.zeros(5, 6),
                      image_paths=list("vwxyz"), extras={"flipped": [0, 1, 0, 1, 0], "scale": 2.0})
    part = slice_batch(batch, 1, 3)
    assert part.prompts == ["b", "c"] and part.image_paths == ["w", "x"] and part.size_cond.shape == (2, 6)
    assert part.latents.flatten().tolist() == [1.0, 2.0]
    assert part.extras == {"flipped": [1, 0], "scale": 2.0}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_the_slices_of_a_prior_preservation_batch_weighted_by_share_add_up_to_its_loss(world):
    """DreamBooth's two means (instance, class) split across processes: slices of one kind only included."""
    from finetune_core.data.data_batch import DataBatch
    from finetune_core.data.paired import IS_CLASS
    from finetune_core.methods.prior_preservation import prior_loss
    from finetune_core.train.train_batch import TrainBatch
    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)

    def batch_of(rows: slice) -> TrainBatch:
        data = DataBatch(target[rows], list("iicc")[rows], torch.zeros(4, 6)[rows],
                         extras={IS_CLASS: [False, False, True, True][rows]})
        return TrainBatch(data, target[rows], target[rows], torch.zeros(4)[rows], target[rows], target[rows],
                          torch.ones(10), data.size_cond)
    whole = prior_loss(pred, batch_of(slice(0, 4)), 0.5)
    expected = ((pred[:2] - target[:2]) ** 2).mean() + 0.5 * ((pred[2:] - target[2:]) ** 2).mean()
    torch.testing.assert_close(whole, expected)

    class Rank(Processes):
        def __init__(self, rank: int) -> None:
            self.rank, self.world = rank, world
    parts = []
    for rank in range(world):
        shard = Rank(rank).shard(batch_of(slice(0, 4)).data)
        rows = slice(shard.start, shard.start + len(shard.data))
        if len(shard.data):
            parts.append(prior_loss(pred[rows], batch_of(rows), 0.5) * shard.weight)
    torch.testing.assert_close(sum(parts), whole)


def test_the_memory_check_counts_the_largest_slice_each_process_holds(tmp_path, monkeypatch):
    """Batch 3 over 2 processes: each holds at most 2 samples, so the measurement is for 2; one process holds 3."""
    from finetune_core.jobs import fit
    from finetune_core.train import memory

    class Checked(Exception):
        pass

    class SecondOfTwo(Processes):
        rank, world = 1, 2

    seen: list[int] = []

    def capture(request: Any, device: Any, free: Any) -> None:
        batch = request.settings["data"]["batch_size"]
        seen.append(-(-batch // request.hardware.processes))  # the share `fit.run_steps` measures
        raise Checked

    monkeypatch.setattr(memory, "free_device_memory", lambda device: 1 << 40)  # as if on a GPU: the check runs
    monkeypatch.setattr(fit, "check_fits", capture)
    data = tmp_path / "data"
    shutil.copytree(EXAMPLES, data)
    job = {**_jobs(data)[0], "train": {**TRAIN, "save_every": 0}}
    for processes in (Processes(), SecondOfTwo()):
        with pytest.raises(Checked):
            service.train(request_of(job), build_tiny("tiny-sd1"), service.OutputFolders.standalone(tmp_path),
                          processes=processes)
    assert seen == [3, 2]
