"""Atomic writes: never half a file, never a silent overwrite, and the usual file mode."""

from __future__ import annotations

import os
import stat

import pytest

from finetune_core.errors import ArtifactError
from finetune_core.formats.atomic import atomic_write


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "a.bin", lambda p: p.write_bytes(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.bin"
    target.write_bytes(b"old")

    def broken(path):
        path.write_bytes(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        atomic_write(target, broken, overwrite=True)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["keep.bin"]
    with pytest.raises(ArtifactError, match="already exists"):
        atomic_write(target, lambda p: p.write_bytes(b"new"))
