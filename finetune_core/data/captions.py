"""Captions: from `<image>.txt` or the file name (WebUI rules), and tag shuffle / keep-first-N / dropout."""

from __future__ import annotations

import codecs
import random
import re
from pathlib import Path
from typing import Any

from finetune_core.errors import DatasetError

try:  # the stdlib's own parser of regular expressions (renamed in Python 3.11)
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # Python 3.10
    import sre_parse as _sre_parse

# The WebUI strips a leading run of digits and dashes (e.g. "00012-" from preprocessed files) from file names.
_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")

CAPTION_FROM_TXT = "txt"
CAPTION_FROM_FILENAME = "filename"


def caption_from_filename(stem: str, word_regex: str = "", join_string: str = " ") -> str:
    """Caption from a file stem as the WebUI does: drop leading digits/dashes, optionally keep only regex words."""
    text = _LEADING_NUMBERS.sub("", stem)
    if word_regex:
        text = join_string.join(find_words(word_regex, text, stem))
    return text


WORD_REGEX_SECONDS = 0.5  # what one file name may cost the filename word regex; a sane one takes microseconds


def word_regex_problems(pattern: str) -> list[str]:
    """Why a filename word regex from a request cannot run bounded: not valid, or a quantifier over a quantifier
    (`(a+)+`, `(\\w*)*`), whose backtracking grows exponentially with the name's length."""
    try:
        parsed = _sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        return [f"filename_word_regex '{pattern}' is not a valid regular expression ({exc})"]
    if _nested_repeat(parsed, inside_repeat=False):
        return [f"filename_word_regex '{pattern}' repeats a group that itself repeats (such as (a+)+ or (\\w*)*); "
                f"on an unlucky file name it backtracks for hours. Write it without the outer repeat, e.g. "
                f"\\w+ instead of (\\w+)+"]
    return []


def _nested_repeat(items: Any, inside_repeat: bool) -> bool:
    """True when a repeat that can match more than once holds a repeat of variable length."""
    for op, value in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, sub = value
            if inside_repeat and low != high:
                return True
            if _nested_repeat(sub, inside_repeat or high is _sre_parse.MAXREPEAT or high > 1):
                return True
        elif any(_nested_repeat(sub, inside_repeat) for sub in _subpatterns(name, value)):
            return True
    return False


def _subpatterns(name: str, value: Any) -> list[Any]:
    """The nested patterns of one parsed node (groups, alternatives, look-arounds, conditionals, atomic groups)."""
    if name == "SUBPATTERN":
        return [value[-1]]
    if name == "BRANCH":
        return list(value[1])
    if name in ("ASSERT", "ASSERT_NOT"):
        return [value[1]]
    if name == "GROUPREF_EXISTS":
        return [sub for sub in value[1:] if sub is not None]
    if name == "ATOMIC_GROUP":
        return [value]
    return []


def find_words(pattern: str, text: str, where: str) -> list[str]:
    """`re.findall(pattern, text)`, bounded to WORD_REGEX_SECONDS where the `regex` package is there (the WebUI and
    the standalone install have it; it also lets other threads run meanwhile); past it, a DatasetError naming the
    file. Without it `word_regex_problems` is the only guard."""
    try:
        import regex
    except ImportError:
        regex = None
    try:
        found = regex.findall(pattern, text, timeout=WORD_REGEX_SECONDS) if regex else re.findall(pattern, text)
    except TimeoutError:
        raise DatasetError(f"the filename word regex '{pattern}' took longer than {WORD_REGEX_SECONDS} s on the "
                           f"file name '{where}' (it backtracks); simplify it, e.g. without alternatives that can "
                           f"match the same letters inside a repeat") from None
    # Several groups make findall return tuples (the WebUI's join would fail on them): their parts joined.
    return [item if isinstance(item, str) else "".join(item) for item in found]


def caption_file(image_path: Path) -> Path:
    """The `.txt` file whose text captions `image_path` (same folder, same stem)."""
    return image_path.with_suffix(".txt")


def read_caption(image_path: Path, word_regex: str = "",
                 join_string: str = " ") -> tuple[str, str, str, tuple[str, ...]]:
    """(caption, source, encoding, notes) for an image: the `.txt` next to it, else its file name (encoding "").

    `notes` say what was changed in a caption file's text so the run and lint can name the file (see `clean_caption`).
    """
    text_path = caption_file(image_path)
    if text_path.is_file():
        text, encoding = read_text(text_path, CAPTION_READ_BYTES)
        caption, notes = clean_caption(text)
        return caption, CAPTION_FROM_TXT, encoding, notes
    return caption_from_filename(image_path.stem, word_regex, join_string), CAPTION_FROM_FILENAME, "", ()


# What a text encoder sees of a prompt: 75-token chunks, and no trainer uses more than 3 of them for a caption
# (sd-scripts' longest `max_token_length` is 225). A caption is cut before anything is built from it.
CAPTION_CHUNKS = 3
CAPTION_TOKENS = 75 * CAPTION_CHUNKS
# The CLIP tokenizer makes one token or more of every word, and its longest token is 32 bytes: the first
# CAPTION_TOKENS words, and at most CAPTION_TOKENS * 33 characters of them, hold every token the encoder sees.
_TOKEN_CHARS = 33
CAPTION_CHARS = CAPTION_TOKENS * _TOKEN_CHARS
CAPTION_READ_BYTES = 4 * CAPTION_CHARS + 4096  # UTF-32 takes 4 bytes a character; room for runs of blanks
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_caption(text: str) -> tuple[str, tuple[str, ...]]:
    """(one-line caption, notes): blanks and line breaks made single spaces; control characters (a NUL, an escape)
    removed, and the text cut at what the text encoder can see; each change is noted."""
    notes = []
    if _CONTROL.search(text):
        notes.append("control characters (such as NUL) were removed")
        text = _CONTROL.sub(" ", text)
    words = text.split()
    caption = " ".join(words[:CAPTION_TOKENS])[:CAPTION_CHARS]
    if len(words) > CAPTION_TOKENS or len(caption) < len(" ".join(words)):
        notes.append(f"it is longer than the {CAPTION_TOKENS} tokens ({CAPTION_CHUNKS} chunks of 75) a text encoder "
                     f"is given, so only its start is used")
    return caption, tuple(notes)


# Byte-order marks, longest first (a UTF-32 LE mark starts like the UTF-16 LE one).
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
UTF8 = ("utf-8", "utf-8-sig")


def read_text(path: Path, limit: int | None = None) -> tuple[str, str]:
    """(text, encoding) of a user's text file, decoded as editors write them; only its first `limit` bytes when given.

    UTF-8 with or without a byte-order mark, UTF-16/32 with one (Windows Notepad's "Unicode"), UTF-16 without one
    when every other byte is zero; anything else is read as Windows-1252 (the usual non-UTF-8 Latin text) rather
    than turned into replacement characters. Callers say so when the encoding is not UTF-8.
    """
    with open(path, "rb") as handle:
        data = handle.read(limit if limit is not None else -1)
        cut = limit is not None and bool(handle.read(1))
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data.decode(encoding, errors="replace"), encoding
    if len(data) >= 2 and len(data) % 2 == 0 and b"\0" in data:  # NUL is valid UTF-8 but never in a caption
        encoding = "utf-16-le" if data[1::2].count(0) >= data[0::2].count(0) else "utf-16-be"
        return data.decode(encoding, errors="replace"), encoding
    for encoding in ("utf-8", "cp1252"):
        # A cut may split the last UTF-8 character: up to 3 bytes of it are dropped.
        for end in ((len(data), len(data) - 1, len(data) - 2, len(data) - 3) if cut else (len(data),)):
            try:
                return data[:end].decode(encoding), encoding
            except UnicodeDecodeError:
                pass
    return data.decode("latin-1"), "latin-1"


def split_tags(caption: str) -> list[str]:
    """Split a caption on commas into trimmed, non-empty tags."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def join_tags(tags: list[str]) -> str:
    """Join tags back into a caption."""
    return ", ".join(tags)


def shuffle_tags(tags: list[str], rng: random.Random, keep: int = 0) -> list[str]:
    """Shuffle the tags after the first `keep`, which stay in place (e.g. a trigger word)."""
    head, tail = tags[:keep], list(tags[keep:])
    rng.shuffle(tail)
    return head + tail


def drop_tags(tags: list[str], probability: float, rng: random.Random, keep: int = 0) -> list[str]:
    """Drop each tag after the first `keep` with `probability`; the kept tags are never dropped."""
    head, tail = tags[:keep], tags[keep:]
    # One draw per tag, always, so the random stream does not depend on which tags survive.
    draws = [rng.random() for _ in tail]
    return head + [tag for tag, draw in zip(tail, draws) if draw >= probability]


def augment_caption(caption: str, rng: random.Random, shuffle: bool, dropout: float, keep: int = 0) -> str:
    """The `[filewords]` text for one step: tags dropped then shuffled; the caption is untouched when both are off."""
    if not shuffle and dropout <= 0:
        return caption
    tags = split_tags(caption)
    if dropout > 0:
        tags = drop_tags(tags, dropout, rng, keep)
    if shuffle:
        tags = shuffle_tags(tags, rng, keep)
    return join_tags(tags)
