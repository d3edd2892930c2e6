"""The `.optim` sidecar: paired by hash, loadable by a stock WebUI."""

from __future__ import annotations

import torch

from finetune_core.formats.optim_sidecar import (
    OptimizerSidecar,
    file_shorthash,
    read_optimizer_sidecar,
    sidecar_path,
    write_optimizer_sidecar,
)


def test_sidecar_round_trip_and_hash_pairing(tmp_path, gate):
    artefact = tmp_path / "bar.pt"
    artefact.write_bytes(b"pretend hypernetwork")
    weight = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    weight.sum().backward()
    optimizer.step()
    digest = file_shorthash(artefact)
    assert len(digest) == 10
    path = write_optimizer_sidecar(artefact, OptimizerSidecar(digest, optimizer.state_dict(), "AdamW"))
    assert path == sidecar_path(artefact) and path.name == "bar.pt.optim"
    gate(path)
    back = read_optimizer_sidecar(artefact, expected_hash=digest)
    assert back is not None and back.optimizer_name == "AdamW"
    restored = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, 2))], lr=0.1)
    restored.load_state_dict(back.optimizer_state_dict)
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert read_optimizer_sidecar(artefact, expected_hash="0000000000") is None
    assert read_optimizer_sidecar(tmp_path / "other.pt") is None
