"""Artefact names: the WebUI's sanitising rule, refusals for names that would escape the folder, and the refusal of a
second file of the same name (the suffixes the WebUI loads for each kind of artefact, from `formats.kinds`)."""

from __future__ import annotations

from pathlib import Path

from finetune_core.errors import ArtifactError, ConfigError
from finetune_core.formats.kinds import KIND_OF_FOLDER

_ALLOWED_PUNCTUATION = "._- "
# Names Windows reserves for devices, with or without an extension ("nul.pt" cannot be created there).
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
# File systems allow 255 bytes per name; the run adds "-<step>.safetensors" and a temporary ".<8>.tmp" around it.
MAX_NAME_BYTES = 200


def sanitize_name(name: str, what: str = "name") -> str:
    """The name as typed when it holds only letters, digits and `._- ` (what the WebUI's create_embedding keeps);
    anything else is refused with a sentence (the WebUI drops it silently, so the file gets another name).

    `/`, `\\`, `..` and control characters are refused with a sentence rather than silently dropped, because a user
    who typed them meant a path (or pasted something else); so are names Windows reserves and names too long for a
    file system.
    """
    raw = name.strip()
    if not raw:
        raise ConfigError(f"the {what} is empty; type a name such as 'my-style'")
    if "/" in raw or "\\" in raw or ".." in raw:
        raise ConfigError(f"the {what} {raw!r} contains '/', '\\' or '..'; use a plain name without folders "
                          f"(the file always goes into its output folder)")
    if any(not c.isprintable() for c in raw):
        raise ConfigError(f"the {what} {raw!r} contains control characters (such as a tab or a newline); "
                          f"type the name again without them")
    bad = sorted({c for c in raw if not (c.isalnum() or c in _ALLOWED_PUNCTUATION)})
    cleaned = "".join(c for c in raw if c.isalnum() or c in _ALLOWED_PUNCTUATION).strip()
    if not cleaned or cleaned.strip(".") == "":
        raise ConfigError(f"the {what} {raw!r} has no usable characters (only letters, digits and '._- ' are kept)")
    if bad:  # never a file of another name than the one typed, without a word (the WebUI drops them silently)
        raise ConfigError(f"the {what} {raw!r} has characters a file name cannot hold ({''.join(bad)!r}); use "
                          f"letters, digits, '.', '_', '-' or spaces, e.g. {cleaned!r}")
    if cleaned.split(".")[0].strip().upper() in _RESERVED:
        raise ConfigError(f"the {what} {cleaned!r} is a device name on Windows (CON, PRN, AUX, NUL, COM1-9, "
                          f"LPT1-9), so the file could not be opened there; choose another name")
    if len(cleaned.encode("utf-8")) > MAX_NAME_BYTES:
        raise ConfigError(f"the {what} is {len(cleaned.encode('utf-8'))} bytes long; file names hold at most "
                          f"{MAX_NAME_BYTES} here (the run adds a step number and a suffix); choose a shorter one")
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


def same_name_files(folder: Path, name: str, kind: str) -> list[Path]:
    """Files in `folder` the WebUI would load under `name` (any of its formats for that kind of artefact)."""
    suffixes = KIND_OF_FOLDER[kind].suffixes if kind in KIND_OF_FOLDER else ()
    if not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.stem == name
                  and p.suffix.lower() in suffixes)


def refuse_same_name(folder: Path, name: str, kind: str) -> None:
    """Refuse to write an artefact `name` where one of that name exists in any format (the WebUI would see two)."""
    found = same_name_files(folder, name, kind)
    if found:
        others = " and ".join(str(p) for p in found)
        raise ArtifactError(f"{others} already exists; choose another name, or ask to overwrite it")
