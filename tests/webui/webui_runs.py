"""Helpers for the SD2 / SDXL WebUI-stub tests: a fast exact weights snapshot and short service.train runs."""

from __future__ import annotations

import torch

from finetune_core.jobs import service


def snapshot(sd_model) -> dict[str, torch.Tensor]:
    """An exact copy of every tensor (value and dtype) of the loaded model."""
    return {k: v.detach().to("cpu", copy=True) for k, v in sd_model.state_dict().items()}


def same_weights(sd_model, before: dict[str, torch.Tensor]) -> bool:
    now = sd_model.state_dict()
    return set(now) == set(before) and all(
        now[k].dtype == v.dtype and torch.equal(now[k].detach().to("cpu"), v) for k, v in before.items())


def request(dataset, method: str, name: str, steps: int = 2, method_settings=None) -> service.TrainRequest:
    if method_settings is None:
        method_settings = {"init_text": "cat", "num_vectors": 2} if method == "textual-inversion" else {}
    return service.TrainRequest(method=method, name=name, method_settings=method_settings,
                                data_settings={"data_dir": str(dataset), "width": 64, "height": 64},
                                train_settings={"steps": steps, "learning_rate": "0.01", "save_every": 0,
                                                "preview_every": 0, "csv_every": 0})


def train(model, dataset, tmp_path, method: str, name: str, steps: int = 2) -> service.JobResult:
    folders = service.OutputFolders.standalone(tmp_path / "out")
    return service.train(request(dataset, method, name, steps), model, folders)


def spy_on_steps(monkeypatch):
    """Record, for every training step, the low-VRAM hook calls made inside it, and where the modules were at each
    gradient-enabled predict. Returns the two lists, filled as training runs."""
    import torch
    from modules import lowvram

    from finetune_core.model.webui_backend import WebUIModel
    from finetune_core.train import loop

    fired_inside, resident = [], []
    step, predict = loop.train_step, WebUIModel.predict

    def spy_step(*args, **kwargs):
        calls = len(lowvram.hook_calls)
        try:
            return step(*args, **kwargs)
        finally:
            fired_inside.append(lowvram.hook_calls[calls:])

    def spy_predict(self, *args, **kwargs):
        out = predict(self, *args, **kwargs)
        if torch.is_grad_enabled():
            resident.append(dict(lowvram.location))
        return out

    monkeypatch.setattr(loop, "train_step", spy_step)
    monkeypatch.setattr(WebUIModel, "predict", spy_predict)
    return fired_inside, resident
