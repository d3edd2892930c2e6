"""The checkpoint hash cache: a seen file is not hashed again; a changed or unknown one is; a bad cache is ignored."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from finetune_core.formats import checkpoint, hash_cache


@pytest.fixture
def hash_calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Every full hash computed, in order (the real hash still runs); the cache file is this test's own."""
    monkeypatch.setenv(hash_cache.ENV_VAR, str(tmp_path / "cache" / "hashes.json"))
    calls: list[Path] = []
    real = checkpoint.file_sha256

    def counting(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
        calls.append(Path(path))
        return real(path, chunk_size)
    monkeypatch.setattr(checkpoint, "file_sha256", counting)
    return calls


def _file(tmp_path: Path, content: bytes = b"weights" * 1000) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    return path


def test_a_seen_file_is_not_hashed_again(tmp_path: Path, hash_calls: list[Path]) -> None:
    path = _file(tmp_path)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert hash_cache.cached_sha256(path) == expected
    assert hash_cache.cached_sha256(tmp_path / "." / "model.safetensors") == expected  # same resolved path
    assert len(hash_calls) == 1
    assert hash_cache.cache_path() == tmp_path / "cache" / "hashes.json" and hash_cache.cache_path().is_file()


def test_a_changed_mtime_or_size_is_hashed_again(tmp_path: Path, hash_calls: list[Path]) -> None:
    path = _file(tmp_path)
    hash_cache.cached_sha256(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert hash_cache.cached_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(hash_calls) == 2
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime as first seen, but a different size:
    with open(path, "ab") as handle:
        handle.write(b"more")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert hash_cache.cached_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(hash_calls) == 3
    hash_cache.cached_sha256(path)
    assert len(hash_calls) == 3


@pytest.mark.parametrize("content", [b"\x00\xffnot json", b"[1, 2]", b'{"format": 99, "files": {}}',
                                     b'{"format": 1, "files": []}'])
def test_a_corrupt_cache_file_is_ignored_and_replaced(tmp_path: Path, hash_calls: list[Path], content: bytes) -> None:
    path = _file(tmp_path)
    hash_cache.cache_path().parent.mkdir(parents=True)
    hash_cache.cache_path().write_bytes(content)
    assert hash_cache.cached_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    hash_cache.cached_sha256(path)
    assert len(hash_calls) == 1
    assert json.loads(hash_cache.cache_path().read_text())["format"] == 1


def test_a_forged_entry_with_a_bad_hash_is_not_trusted(tmp_path: Path, hash_calls: list[Path]) -> None:
    path = _file(tmp_path)
    stat = path.stat()
    hash_cache.cache_path().parent.mkdir(parents=True)
    entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": "not-a-hash"}
    hash_cache.cache_path().write_text(json.dumps({"format": 1, "files": {str(path.resolve()): entry}}))
    assert hash_cache.cached_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(hash_calls) == 1


def test_an_unwritable_cache_only_costs_a_rehash(tmp_path: Path, hash_calls: list[Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = _file(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv(hash_cache.ENV_VAR, str(blocker / "hashes.json"))  # its folder is a file
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert hash_cache.cached_sha256(path) == expected and hash_cache.cached_sha256(path) == expected
    assert len(hash_calls) == 2


def test_default_location_is_the_user_cache_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(hash_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if os.name == "posix" and os.uname().sysname == "Linux":
        assert hash_cache.cache_path() == tmp_path / "finetune-core" / "hashes.json"
    assert hash_cache.cache_path().name == "hashes.json"
