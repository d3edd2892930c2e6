"""Prompt chunking as the WebUI does it: embeddings as slots, no straddling, comma backtracking."""

from __future__ import annotations

from finetune_core.model.chunks import CHUNK_LENGTH, SLOT_ID, Chunk, chunk_ids, count_tokens, split_chunks

COMMA = 267


def test_empty_prompt_is_one_empty_chunk() -> None:
    chunks = split_chunks([], {}, COMMA)
    assert len(chunks) == 1 and chunks[0].tokens == [] and count_tokens(chunks) == 0


def test_embedding_takes_one_slot_per_vector_longest_name_first() -> None:
    names = {"ab": ([5, 6], 3), "a": ([5], 1)}
    chunks = split_chunks([1, 5, 6, 2, 5, 9], names, COMMA)
    assert chunks[0].tokens == [1, SLOT_ID, SLOT_ID, SLOT_ID, 2, SLOT_ID, 9]
    assert chunks[0].fixes == [(1, "ab"), (5, "a")]


def test_long_prompt_splits_at_75() -> None:
    chunks = split_chunks(list(range(1000, 1100)), {}, COMMA)
    assert [len(c.tokens) for c in chunks] == [75, 25] and count_tokens(chunks) == 100


def test_embedding_never_straddles_chunks() -> None:
    tokens = list(range(1000, 1073)) + [5] + [7]
    chunks = split_chunks(tokens, {"e": ([5], 4)}, COMMA)
    assert len(chunks[0].tokens) == 73 and chunks[1].fixes == [(0, "e")] and chunks[1].tokens[:5] == [0, 0, 0, 0, 7]


def test_full_chunk_breaks_after_a_recent_comma() -> None:
    tokens = list(range(1000, 1070)) + [COMMA] + [1, 2, 3, 4, 5, 6, 7]
    chunks = split_chunks(tokens, {"e": ([3], 1)}, COMMA)
    assert chunks[0].tokens[-1] == COMMA and len(chunks[0].tokens) == 71
    assert chunks[1].tokens == [1, 2, SLOT_ID, 4, 5, 6, 7] and chunks[1].fixes == [(2, "e")]


def test_chunk_ids_pad_after_eos() -> None:
    ids = chunk_ids(Chunk([1, 2]), 49406, 49407, 0)
    assert len(ids) == CHUNK_LENGTH + 2 and ids[:4] == [49406, 1, 2, 49407] and set(ids[4:]) == {0}
    assert set(chunk_ids(Chunk([1]), 49406, 49407, 49407)[2:]) == {49407}
