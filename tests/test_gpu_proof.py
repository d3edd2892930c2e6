"""`make gpu-proof` on the CPU with a tiny model: the same code path, so that it never rots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_core.bench.gpu_proof import main


def test_the_gpu_proof_runs_on_the_cpu_with_a_tiny_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    assert main(["--device", "cpu", "--models", "tiny-sd1", "--methods", "textual-inversion", "--steps", "2",
                 "--fit", "8GB", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["settings"] for r in rows] == ["defaults"]  # a tiny model fits 8 GB as it is
    assert rows[0]["ratio"] == pytest.approx(1.0, rel=0.05)  # the real steps' count against the fake measurement
    assert rows[0]["seconds_per_step"] > 0 and "tiny-sd1" in capsys.readouterr().out
