"""The test gate itself must refuse what the stock WebUI refuses, or the format tests prove nothing."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch

from finetune_core.formats.atomic import save_pt


class _Exploit:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("true",))


def test_gate_accepts_legacy_tensor_dict(tmp_path, gate):
    path = save_pt({"a": torch.zeros(2, 3), "b": [1, "x", None]}, tmp_path / "ok.pt")
    seen = gate(path)
    assert ("torch._utils", "_rebuild_tensor_v2") in seen
    assert ("torch", "FloatStorage") in seen


def test_gate_refuses_extra_zip_entries_of_current_torch(tmp_path, gate):
    path = tmp_path / "zip.pt"
    torch.save({"a": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as archive:
        extra = [n for n in archive.namelist() if n.split("/", 1)[1] in (".format_version", ".storage_alignment")]
    if not extra:
        pytest.skip("this torch writes no extra zip entries")
    with pytest.raises(pickle.UnpicklingError, match="bad file inside"):
        gate(path)


def test_gate_refuses_os_system(tmp_path, gate):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"x": _Exploit()}))
    with pytest.raises(pickle.UnpicklingError, match="forbidden"):
        gate(path)
