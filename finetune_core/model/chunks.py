"""Splitting a tokenized prompt into the WebUI's 75-token chunks, with textual-inversion embeddings as token slots.

Pure list logic shared by the text paths of the standalone backend; it mirrors `sd_hijack_clip`'s
`tokenize_line`: embeddings are found by their name's token sequence (longest first), take one slot per vector,
never straddle two chunks, and a full chunk is broken after a recent comma (`comma_padding_backtrack` = 20).
"""

from __future__ import annotations

from dataclasses import dataclass, field

CHUNK_LENGTH = 75
COMMA_BACKTRACK = 20
# The id written in an embedding's slots before its vectors replace them; any id but EOS works (WebUI uses 0).
SLOT_ID = 0


@dataclass
class Chunk:
    """Up to 75 content tokens and where embedding vectors go: (offset in the content, embedding name)."""

    tokens: list[int] = field(default_factory=list)
    fixes: list[tuple[int, str]] = field(default_factory=list)


def find_embedding(tokens: list[int], position: int, names: dict[str, tuple[list[int], int]]) -> tuple[str, int] | None:
    """The embedding whose name's tokens start at `position` (longest name wins): (name, tokens it covers)."""
    best: tuple[str, int] | None = None
    for name, (ids, _) in names.items():
        if ids and tokens[position:position + len(ids)] == ids and (best is None or len(ids) > best[1]):
            best = (name, len(ids))
    return best


def split_chunks(tokens: list[int], names: dict[str, tuple[list[int], int]], comma_id: int) -> list[Chunk]:
    """Split prompt tokens into chunks; `names` maps an embedding name to (its name's token ids, its vector count)."""
    chunks: list[Chunk] = []
    chunk, last_comma, position = Chunk(), -1, 0
    while position < len(tokens):
        token = tokens[position]
        if token == comma_id:
            last_comma = len(chunk.tokens)
        elif len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1 and \
                len(chunk.tokens) - last_comma <= COMMA_BACKTRACK:
            # Move the words after the last comma to the next chunk, so a phrase is not cut in two.
            moved = chunk.tokens[last_comma + 1:]
            chunks.append(Chunk(chunk.tokens[:last_comma + 1], [f for f in chunk.fixes if f[0] <= last_comma]))
            chunk = Chunk(moved, [(o - last_comma - 1, n) for o, n in chunk.fixes if o > last_comma])
            last_comma = -1
        if len(chunk.tokens) == CHUNK_LENGTH:
            chunks.append(chunk)
            chunk, last_comma = Chunk(), -1
        found = find_embedding(tokens, position, names)
        if found is None:
            chunk.tokens.append(token)
            position += 1
            continue
        name, covered = found
        n_vectors = names[name][1]
        if len(chunk.tokens) + n_vectors > CHUNK_LENGTH:
            chunks.append(chunk)
            chunk, last_comma = Chunk(), -1
        chunk.fixes.append((len(chunk.tokens), name))
        chunk.tokens.extend([SLOT_ID] * n_vectors)
        position += covered
    if chunk.tokens or not chunks:
        chunks.append(chunk)
    return chunks


def chunk_ids(chunk: Chunk, bos_id: int, eos_id: int, pad_id: int) -> list[int]:
    """The 77 ids the text encoder sees: BOS, content, EOS, then pad ids (SD1 pads with EOS, OpenCLIP with 0)."""
    return [bos_id, *chunk.tokens, eos_id] + [pad_id] * (CHUNK_LENGTH - len(chunk.tokens))


def count_tokens(chunks: list[Chunk]) -> int:
    """Prompt length in tokens as the WebUI counter shows it (content tokens, embedding slots included)."""
    return sum(len(c.tokens) for c in chunks)
