"""Artefact names: the WebUI's sanitising rule, plus refusals for names that would escape the folder."""

from __future__ import annotations

from pathlib import Path

from finetune_core.errors import ArtifactError, ConfigError

_ALLOWED_PUNCTUATION = "._- "


def sanitize_name(name: str, what: str = "name") -> str:
    """Keep letters, digits and `._- ` as the WebUI's create_embedding does; refuse what could escape the folder.

    `/`, `\\`, `..` and control characters are refused with a sentence rather than silently dropped, because a user
    who typed them meant a path, not a name.
    """
    raw = name.strip()
    if not raw:
        raise ConfigError(f"the {what} is empty; type a name such as 'my-style'")
    if "/" in raw or "\\" in raw or ".." in raw:
        raise ConfigError(f"the {what} {raw!r} contains '/', '\\' or '..'; use a plain name without folders "
                          f"(the file always goes into its output folder)")
    bad = sorted({c for c in raw if not (c.isalnum() or c in _ALLOWED_PUNCTUATION)})
    cleaned = "".join(c for c in raw if c.isalnum() or c in _ALLOWED_PUNCTUATION).strip()
    if not cleaned or cleaned.strip(".") == "":
        raise ConfigError(f"the {what} {raw!r} has no usable characters (only letters, digits and '._- ' are kept)")
    if bad and len(cleaned) < len(raw) / 2:
        raise ConfigError(f"the {what} {raw!r} is mostly characters a file name cannot hold ({''.join(bad)!r}); "
                          f"use letters, digits, '.', '_', '-' or spaces")
    return cleaned


def find_artifact(reference: str, folder: Path, suffixes: tuple[str, ...], what: str) -> Path:
    """A path as given, or `<reference><suffix>` anywhere under `folder` (the WebUI lists both folders recursively)."""
    direct = Path(reference).expanduser()
    if direct.is_file():
        return direct
    for suffix in suffixes:
        matches = sorted(Path(folder).rglob(f"{reference}{suffix}")) if Path(folder).is_dir() else []
        if matches:
            return matches[0]
    names = "/".join(suffixes)
    raise ArtifactError(f"no {what} {reference!r} found: it is not a file and {folder} has no {reference}{names}")
