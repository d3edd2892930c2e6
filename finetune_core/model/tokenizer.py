"""The CLIP byte-level BPE tokenizer (SD1, SD2 and SDXL all use it), built from the vocabulary open_clip ships.

It matches OpenAI CLIP's `SimpleTokenizer`: the same text cleaning, word pattern and merge ranks, so prompts get
the ids the WebUI's tokenizers give them. No network, no transformers tokenizer files.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from itertools import pairwise
from pathlib import Path
from typing import Any

from finetune_core.errors import FinetuneError

BOS_TEXT = "<|startoftext|>"
EOS_TEXT = "<|endoftext|>"
# The merges file has a version line first; CLIP uses the first 49152 - 256 - 2 merges after it.
_N_MERGES = 49152 - 256 - 2
_WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bpe_vocab_path() -> Path:
    """Where open_clip keeps `bpe_simple_vocab_16e6.txt.gz` (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FinetuneError("The CLIP tokenizer needs the vocabulary file that the package open_clip_torch ships, "
                            "but open_clip_torch is not installed: install it with `pip install open_clip_torch`.")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FinetuneError(f"The CLIP vocabulary file {path} is missing: reinstall open_clip_torch.")
    return path


def byte_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from the 256 byte values to printable characters (as in OpenAI CLIP / GPT-2)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """Clean a prompt as CLIP does: fix mojibake (ftfy), unescape HTML twice, collapse whitespace, lower-case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """CLIP BPE tokenizer: 49408 ids, `<|startoftext|>` = 49406, `<|endoftext|>` = 49407."""

    def __init__(self, vocab_path: str | Path | None = None) -> None:
        import regex

        path = Path(vocab_path) if vocab_path is not None else bpe_vocab_path()
        with gzip.open(path) as handle:
            lines = handle.read().decode("utf-8").split("\n")[1:_N_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        self._byte_encoder = byte_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        symbols = list(self._byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TEXT, EOS_TEXT]
        self._encoder = {piece: i for i, piece in enumerate(vocab)}
        self._decoder = dict(enumerate(vocab))
        self._ranks = {m: i for i, m in enumerate(merges)}
        self._pattern: Any = regex.compile(_WORD_PATTERN, regex.IGNORECASE)
        # Per-instance memo of word -> BPE pieces; prompts repeat words a lot.
        self._cache: dict[str, list[str]] = {BOS_TEXT: [BOS_TEXT], EOS_TEXT: [EOS_TEXT]}

    @property
    def bos_id(self) -> int:
        return self._encoder[BOS_TEXT]

    @property
    def eos_id(self) -> int:
        return self._encoder[EOS_TEXT]

    @property
    def vocab_size(self) -> int:
        return len(self._encoder)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        ids: list[int] = []
        for word in self._pattern.findall(clean_text(text)):
            mapped = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self._encoder[piece] for piece in self._bpe(mapped))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids; word ends become spaces, as CLIP's decoder does."""
        pieces = "".join(self._decoder[int(i)] for i in ids).replace("</w>", " ")
        # A space is not in the byte map (it stands for a word end), so it is written back directly.
        data = bytearray(32 if c == " " else self._byte_decoder[c] for c in pieces)
        return data.decode("utf-8", errors="replace")

    def _bpe(self, word: str) -> list[str]:
        """Apply the merges to one word, lowest rank first (Sennrich et al., 2016)."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            ranked = [(self._ranks.get((a, b), _N_MERGES), i) for i, (a, b) in enumerate(pairwise(parts))]
            best_rank = min(ranked)[0]
            if best_rank >= _N_MERGES:
                break
            pair = parts[min(ranked)[1]], parts[min(ranked)[1] + 1]
            parts = _merge_pair(parts, pair)
        self._cache[word] = parts
        return parts


def _merge_pair(parts: list[str], pair: tuple[str, str]) -> list[str]:
    """Merge every non-overlapping occurrence of `pair`, scanning left to right."""
    merged: list[str] = []
    i = 0
    while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
            merged.append(parts[i] + parts[i + 1])
            i += 2
        else:
            merged.append(parts[i])
            i += 1
    return merged

