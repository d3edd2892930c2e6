"""Safe file I/O shared by every format: atomic writes, WebUI-loadable `.pt` files, and a pickle-safe reader."""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import errno
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
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
    group = _GROUP.get()
    try:
        _write_reporting_os_errors(write, tmp, target)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; artefacts get the usual mode, as the WebUI's do
        if group is not None:
            group.append((tmp, target))  # renamed with the rest of its group
            return target
        os.replace(tmp, target)
    finally:
        if tmp.exists() and (group is None or (tmp, target) not in group):
            tmp.unlink()
    return target


_GROUP: contextvars.ContextVar[list[tuple[Path, Path]] | None] = contextvars.ContextVar("atomic_group", default=None)
_JOURNAL_SUFFIX = ".group.json"


@contextlib.contextmanager
def written_together(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Files `atomic_write` writes in `folder` inside this block land together or not at all (DreamArtist's
    NAME.pt and NAME-neg.pt).

    Every file is written to its temporary first; an error (or a kill) before all are written leaves the old files
    as they were. Then a journal naming the renames is written, the renames follow, and the journal goes: a kill
    among the renames is finished by `finish_interrupted_groups`, which every run calls before it reads the folder.
    """
    group: list[tuple[Path, Path]] = []
    token = _GROUP.set(group)
    try:
        yield
    except BaseException:
        for tmp, _ in group:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _GROUP.reset(token)
    if not group:
        return
    journal = Path(folder) / f".{group[0][1].name}{_JOURNAL_SUFFIX}"
    entries = [[tmp.name, target.name] for tmp, target in group]
    atomic_write(journal, lambda tmp: tmp.write_text(json.dumps(entries), encoding="utf-8"), overwrite=True)
    for tmp, target in group:
        os.replace(tmp, target)
    journal.unlink()


def finish_interrupted_groups(folder: str | os.PathLike[str]) -> list[Path]:
    """Finish the renames of a group a kill interrupted (its journal is only written once every file of it was);
    returns the files that landed now."""
    landed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return landed
    for journal in folder.glob(f".*{_JOURNAL_SUFFIX}"):
        try:
            entries = json.loads(journal.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not ours, or unreadable: leave it
        for tmp_name, target_name in entries:
            if (folder / tmp_name).is_file():
                os.replace(folder / tmp_name, folder / target_name)
                landed.append(folder / target_name)
        journal.unlink()
    return landed


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
        raise ArtifactError(f"{source} is not a file this tool can read: it is {file_kind(source)}, neither a torch "
                            f"file nor a pickle; use the file as it was saved")
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _is_pickle(source):
            raise ArtifactError(f"{source} is not a file this tool can read: it is neither a torch file nor any "
                                f"pickle (random or damaged bytes, or another format with a .pt name); use the "
                                f"file as it was saved") from exc
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


OTHER_BINARY = "binary data of another format"


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
        return OTHER_BINARY
    return "a text file" if b"\x00" not in head else OTHER_BINARY


def _is_pickle(path: Path) -> bool:
    """True for a torch zip file or a well-formed pickle stream (read opcode by opcode, never unpickled)."""
    import pickletools
    import zipfile

    if zipfile.is_zipfile(path):
        return True
    try:
        with open(path, "rb") as handle:
            return any(opcode.name == "STOP" for opcode, _, _ in pickletools.genops(handle))
    except Exception:  # pickletools raises ValueError, EOFError, UnicodeDecodeError ... for what is no pickle
        return False


def require_finite(tensors: Iterable[tuple[str, torch.Tensor]], source: str | os.PathLike[str]) -> None:
    """Refuse tensors read from `source` that hold NaN or infinity: training would start from (and save) garbage."""
    bad = [name for name, tensor in tensors if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise ArtifactError(f"{source} holds values that are not numbers (NaN or infinity) in {', '.join(bad[:3])}; "
                            f"it cannot be trained further: continue from an earlier copy or start a new file")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
