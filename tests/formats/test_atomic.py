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


def test_a_writer_reporting_a_full_disk_in_another_type_raises_an_os_error(tmp_path):
    import errno

    def torch_like(tmp):
        tmp.write_bytes(b"part")
        raise RuntimeError("write(): fd 3 failed with No space left on device")

    with pytest.raises(OSError) as info:
        atomic_write(tmp_path / "x.pt", torch_like)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []  # the temporary file went too
    with pytest.raises(ValueError):  # anything else passes through unchanged
        atomic_write(tmp_path / "y.pt", lambda tmp: (_ for _ in ()).throw(ValueError("a bug")))
