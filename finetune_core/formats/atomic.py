"""Safe file I/O shared by every format: atomic writes, WebUI-loadable `.pt` files, and a pickle-safe reader."""

from __future__ import annotations

import codecs
import errno
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from finetune_core.errors import ArtifactError, StorageError


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object], overwrite: bool = False,
                 needed_bytes: int = 0) -> Path:
    """Call `write(tmp_path)` then rename the temporary file onto `path`, so a crash never leaves half a file.

    Refuses to replace an existing file unless `overwrite` is set, and, when `needed_bytes` is given (a file of
    gigabytes), to start a write the disk has no room for.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise ArtifactError(f"{target} already exists; choose another name or ask to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    if needed_bytes:
        require_free_space(target, needed_bytes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write_reporting_os_errors(write, tmp, target)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; artefacts get the usual mode, as the WebUI's do
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


# What the disk says when a write fails; torch.save reports these as RuntimeError("write(): fd 3 failed with ...").
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO, errno.EFBIG)


def _write_reporting_os_errors(write: Callable[[Path], object], tmp: Path, target: Path) -> None:
    """Call `write(tmp)`; an I/O failure a writer wrapped in another exception type comes out as an OSError."""
    try:
        write(tmp)
    except OSError:
        raise
    except Exception as exc:
        text = str(exc)
        code = next((c for c in _WRITE_ERRNOS if os.strerror(c) in text), None)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(target)) from exc


FREE_SPACE_MARGIN = 64 << 20  # what a disk must keep beyond a file written onto it (logs, state, the system)


def require_free_space(target: Path, needed_bytes: int) -> None:
    """StorageError naming the folder when its disk has less than `needed_bytes` (plus a margin) free."""
    free = shutil.disk_usage(target.parent).free
    if free < needed_bytes + FREE_SPACE_MARGIN:
        raise StorageError(f"the disk of {target.parent} has {free / (1 << 30):.2f} GiB free, but writing "
                           f"{target.name} needs {(needed_bytes + FREE_SPACE_MARGIN) / (1 << 30):.2f} GiB; free "
                           f"some space there or choose an output folder on another disk")


def _umask() -> int:
    """The process umask (read by setting and restoring it; there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_pt(obj: Any, path: str | os.PathLike[str], overwrite: bool = False, needed_bytes: int = 0) -> Path:
    """`torch.save` in the legacy (non-zip) format, atomically.

    A stock WebUI v1.10.1 rejects zip entries that newer torch releases add (`.format_version`,
    `.storage_alignment`); the legacy format is not a zip and goes straight to its restricted unpickler.
    """
    return atomic_write(path, lambda tmp: torch.save(obj, tmp, _use_new_zipfile_serialization=False), overwrite,
                        needed_bytes)


def load_pt(path: str | os.PathLike[str]) -> Any:
    """Load a `.pt`/`.ckpt`/`.bin` allowing only tensors and plain types (`weights_only=True`).

    Raises ArtifactError for a missing, empty, truncated or unsafe file.
    """
    source = Path(path)
    if not source.is_file():
        raise ArtifactError(f"{source} does not exist")
    if source.stat().st_size == 0:
        raise ArtifactError(f"{source} is empty (0 bytes)")
    if not is_torch_file(source):
        raise ArtifactError(f"{source} is not a torch file at all (neither a zip nor a pickle): {file_kind(source)}")
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise refused_pickle(source, exc) from exc
    except Exception as exc:  # torch raises many types for garbage (IndexError, KeyError, EOFError, ...)
        raise ArtifactError(f"{source} is not a readable torch file (truncated or another format): "
                            f"{_first_line(exc)}") from exc


def refused_pickle(source: Path, exc: BaseException) -> ArtifactError:
    """The sentence for a pickle the safe loader refused. torch's own text goes on to suggest `weights_only=False`,
    which would run the file's code: it is never quoted."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f" ({found.group(1)})" if found else ""
    return ArtifactError(f"{source} was refused: it is a pickle that imports something other than tensors and "
                         f"plain values{what}; only safe files are loaded")


def is_torch_file(path: Path) -> bool:
    """A zip (torch's format since 1.6) or a pickle (the legacy format starts with a protocol 2-5 opcode)."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def file_kind(path: Path) -> str:
    """What a file that is not a model file looks like, in a few words."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head[:3] == b"\xff\xd8\xff":
        return "a JPEG image"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at 4096 bytes is fine
    except UnicodeDecodeError:
        return "binary data of another format"
    return "a text file" if b"\x00" not in head else "binary data of another format"


def require_finite(tensors: Iterable[tuple[str, torch.Tensor]], source: str | os.PathLike[str]) -> None:
    """Refuse tensors read from `source` that hold NaN or infinity: training would start from (and save) garbage."""
    bad = [name for name, tensor in tensors if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise ArtifactError(f"{source} holds values that are not numbers (NaN or infinity) in {', '.join(bad[:3])}; "
                            f"it cannot be trained further: continue from an earlier copy or start a new file")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
