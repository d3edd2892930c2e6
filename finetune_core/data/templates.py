"""Prompt templates: files of lines with `[name]` and `[filewords]`, referred to by WebUI basename or by path."""

from __future__ import annotations

import random
from pathlib import Path

from finetune_core.data.captions import read_text
from finetune_core.errors import ConfigError

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
DEFAULT_TEMPLATE = "style_filewords.txt"


def available_templates(extra_dirs: tuple[Path, ...] = ()) -> dict[str, Path]:
    """Template basenames -> files: the shipped ones, then those in `extra_dirs` (searched recursively)."""
    found = {path.name: path for path in sorted(TEMPLATES_DIR.glob("*.txt"))}
    for folder in extra_dirs:
        if folder.is_dir():
            found.update({path.name: path for path in sorted(folder.rglob("*.txt"))})
    return found


def resolve_template(name_or_path: str, extra_dirs: tuple[Path, ...] = ()) -> Path:
    """Find a template by basename (e.g. "subject.txt", or "subject") or by file path."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        return candidate
    known = available_templates(extra_dirs)
    for key in (name_or_path, f"{name_or_path}.txt"):
        if key in known:
            return known[key]
    raise ConfigError(f"the prompt template '{name_or_path}' is neither a file nor a known template; "
                      f"choose one of {', '.join(sorted(known))} or give the path of a .txt file")


def load_template(name_or_path: str, extra_dirs: tuple[Path, ...] = ()) -> list[str]:
    """The non-blank lines of a template; an empty template is an error."""
    path = resolve_template(name_or_path, extra_dirs)
    lines = [line.strip() for line in read_text(path)[0].splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ConfigError(f"the prompt template {path} has no lines; write one prompt per line "
                          f"using [name] and [filewords]")
    return lines


def render_prompt(line: str, name: str, filewords: str) -> str:
    """Fill one template line: `[name]` -> the embedding/hypernetwork name, `[filewords]` -> the caption."""
    return line.replace("[name]", name).replace("[filewords]", filewords)


def draw_line(lines: list[str], rng: random.Random) -> str:
    """Pick one template line; called every step so each step can see a different line (unlike the WebUI)."""
    return lines[rng.randrange(len(lines))]
