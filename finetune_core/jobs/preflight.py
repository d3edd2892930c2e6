"""Checks a job passes before it starts, each answering with one sentence that names the folder or setting:
output folders that can be written with room to spare, no second file of the same name (the memory check, a
measurement, is `finetune_core.jobs.fit.check_fits`). Also clears the hidden temporary files a killed run leaves behind.

None of these checks creates anything: a refused request leaves the disk as it was.
"""

from __future__ import annotations

import errno
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune_core.errors import NetworkError, OutOfMemory, StorageError
from finetune_core.formats.atomic import finish_interrupted_groups

logger = logging.getLogger(__name__)

MIN_FREE_BYTES = 32 << 20  # below this a disk is full for any run: state, CSV and previews need room
# `formats.atomic.atomic_write` names its temporary files `.<target name>.<8 random characters>.tmp`.
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
STALE_AFTER_SECONDS = 60.0  # an atomic write takes seconds; an older temporary file belongs to no live write


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_writable(folder: Path, what: str, min_free: int = MIN_FREE_BYTES) -> None:
    """Refuse a folder that cannot be created or written, or whose disk is (nearly) full; creates nothing."""
    existing = _nearest_existing(Path(folder))
    if not existing.is_dir():
        raise StorageError(f"the {what} {folder} cannot be created because {existing} is a file, not a folder; "
                           f"choose another output folder or move that file away")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise StorageError(f"the {what} {folder} cannot be written ({_reason(exc)}); choose a folder you can "
                           f"write to or fix its permissions") from exc
    free = shutil.disk_usage(existing).free
    if free < min_free:
        raise StorageError(f"the disk of the {what} {folder} has only {_mib(free)} free and this run needs at "
                           f"least {_mib(min_free)}; free some space or choose an output folder on another disk")


def storage_error(exc: OSError, run_dir: Path | None) -> StorageError:
    """One sentence for an operating-system error met while reading or writing, naming the file and what to do."""
    where = f" {exc.filename}" if exc.filename else " a file"
    verb = "write" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG) else "read or write"
    advice = {errno.ENOSPC: "free some space on that disk", errno.EDQUOT: "free some space on that disk",
              errno.EROFS: "choose an output folder you can write to",
              errno.EACCES: "choose an output folder you can write to or fix its permissions",
              errno.ENAMETOOLONG: "choose a shorter name or output folder"}.get(exc.errno or 0, "check that folder")
    return StorageError(f"could not {verb}{where} ({_reason(exc)}); {advice}{_saved_state(run_dir)}")


def network_error(exc: OSError, run_dir: Path | None) -> NetworkError:
    """One sentence for a download that failed inside the job (urllib's URLError and connection errors are
    OSErrors too, but no file of the user's is at fault)."""
    reason = getattr(exc, "reason", None) or _reason(exc)
    return NetworkError(f"something the training called tried to download a file and could not ({reason}); "
                        f"the WebUI fetches some files on first use (SDXL's VAE approximation for previews, for "
                        f"one): run it once with a network, or put the file in place{_saved_state(run_dir)}")


def is_network_error(exc: OSError) -> bool:
    from urllib.error import URLError
    return isinstance(exc, (URLError, ConnectionError, TimeoutError))


def _saved_state(run_dir: Path | None) -> str:
    if run_dir is not None and (Path(run_dir) / "state" / "checkpoint.pt").is_file():
        return f"; the run folder {run_dir} keeps the last saved state: resume it with --resume {run_dir}"
    if run_dir is not None:
        return f"; nothing was saved in the run folder {run_dir} yet"
    return ""


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def remove_stale_temporaries(folder: Path, recursive: bool = False, older_than: float = STALE_AFTER_SECONDS) -> int:
    """Delete the hidden temporary files a killed write left in `folder`; returns how many went. A group of files
    a kill stopped among its renames (a DreamArtist pair) is finished first: its temporaries are complete files."""
    if not Path(folder).is_dir():
        return 0
    for path in finish_interrupted_groups(folder):
        logger.warning("finished writing %s, which a stopped run had written but not yet put in place", path)
    now = time.time()
    candidates = Path(folder).rglob(".*.tmp") if recursive else Path(folder).glob(".*.tmp")
    removed = 0
    for path in candidates:
        try:
            if _TEMPORARY.match(path.name) and path.is_file() and now - path.stat().st_mtime >= older_than:
                path.unlink()
                removed += 1
        except OSError as exc:  # another process may be cleaning too; a leftover is harmless
            logger.debug("could not remove %s: %s", path, exc)
    if removed:
        logger.info("removed %d stale temporary file(s) in %s", removed, folder)
    return removed


def disk_needs(needs: Any, saves_copies: bool, resume_state: bool) -> tuple[int, int]:
    """(bytes for the output folder, bytes for the run folder): the final artefact; an intermediate copy when
    copies are saved, and the resume state (weights plus two Adam moments) when the method keeps one."""
    state = 3 * 4 * needs.trainable if resume_state else 0
    copy = needs.file_bytes if saves_copies else 0
    return MIN_FREE_BYTES + needs.file_bytes, MIN_FREE_BYTES + copy + state


def check_disks(folders: Sequence[tuple[Path, str, int]]) -> None:
    """Refuse folders without room for what they will get (`(folder, what, bytes)`, see `disk_needs`; folders on
    one disk need the sum)."""
    for folder, what, needed in folders:
        shared = sum(n for f, _, n in folders if _same_disk(f, folder))
        check_writable(folder, what, max(needed, shared))


def _same_disk(a: Path, b: Path) -> bool:
    try:
        return _nearest_existing(Path(a)).stat().st_dev == _nearest_existing(Path(b)).stat().st_dev
    except OSError:
        return Path(a) == Path(b)


def out_of_memory(exc: BaseException, model: Any, run_dir: Path | None) -> OutOfMemory:
    """One sentence for an allocator failure met while training."""
    resume = f"; the run folder {run_dir} keeps the last saved state to resume from" if run_dir else ""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return OutOfMemory(f"training ran out of memory on {model.device} ({first[:200]}); lower the batch size or the "
                       f"training size, or turn on gradient checkpointing where the method offers it{resume}")
