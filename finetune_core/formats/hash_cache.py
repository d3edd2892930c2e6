"""A checkpoint's sha256, remembered by (resolved path, size, modification time) so a seen file is not read again.

Hashing a whole SD1.5 file takes 3-6 s and an SDXL file far longer, on every load; the WebUI avoids this with its
`cache.json` (keyed by title and mtime), and this cache does the same for the standalone loaders. Inside the WebUI
the backend takes the hash the WebUI already keeps and never comes here.

The cache is one small JSON file: `$FINETUNE_HASH_CACHE` when set, else `finetune-core/hashes.json` in the user's
cache folder (`%LOCALAPPDATA%` on Windows, `~/Library/Caches` on macOS, `$XDG_CACHE_HOME` or `~/.cache` elsewhere).
An entry counts only when both the size and the modification time (in nanoseconds) match exactly; an unreadable or
corrupt cache file is ignored (and replaced on the next write), and a cache that cannot be written only costs the
next load a re-hash. A file replaced by another of the same size with its modification time preserved (`cp -p`,
`rsync -t`) would keep the old hash, the same blind spot the WebUI's cache has.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from finetune_core.formats import checkpoint

logger = logging.getLogger(__name__)

ENV_VAR = "FINETUNE_HASH_CACHE"
_FORMAT = 1
_MAX_ENTRIES = 500  # a few KiB; entries of files that no longer exist are dropped first


def cache_path() -> Path:
    """Where the hash cache lives (see the module docstring)."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "finetune-core" / "hashes.json"


def cached_sha256(path: str | os.PathLike[str]) -> str:
    """The file's full sha256, from the cache when the file's size and mtime are unchanged, else computed and kept."""
    source = Path(path).resolve()
    stat = source.stat()
    key, stamp = str(source), {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    entries = _read_entries(cache_path())
    entry = entries.get(key)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()) \
            and _is_sha256(entry.get("sha256")):
        logger.debug("hash cache hit for %s", source)
        return str(entry["sha256"])
    digest = checkpoint.file_sha256(source)
    entries[key] = {**stamp, "sha256": digest}
    _write_entries(cache_path(), entries)
    return digest


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _read_entries(path: Path) -> dict[str, Any]:
    """The cached entries, or {} for a missing, unreadable or corrupt cache file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.info("ignoring the unreadable hash cache %s (%s); it will be rewritten", path, exc)
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("format") == _FORMAT else None
    return dict(files) if isinstance(files, dict) else {}


def _write_entries(path: Path, entries: dict[str, Any]) -> None:
    """Replace the cache file atomically (another process reading it sees the old or the new one, never half)."""
    if len(entries) > _MAX_ENTRIES:
        entries = {k: v for k, v in entries.items() if Path(k).exists()}
        entries = dict(list(entries.items())[-_MAX_ENTRIES:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".hashes.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        _warn_unwritable(path, exc)
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"format": _FORMAT, "files": entries}, handle, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        _warn_unwritable(path, exc)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _warn_unwritable(path: Path, exc: OSError) -> None:
    logger.warning("could not write the hash cache %s (%s); the next load hashes the file again", path, exc)
