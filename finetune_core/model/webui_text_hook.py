"""The WebUI backend's generation-time text hook: each text wrapper's `process_tokens` (one call per 77-token
chunk) wrapped by instance, and the chunk rows handed to the hook as `TextChunks` whose re-encoding runs through the
wrapper's own `encode_with_transformers` (embeddings spliced by the hijack, clip skip as set). Imports the WebUI's
`modules` lazily."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from finetune_core.errors import FinetuneError
from finetune_core.model.interface import ChunkHook, EncodedText, TextEncoderSpec
from finetune_core.model.text_chunks import ChunkRows, pooled_at_eos, tensor_digest


@contextmanager
def chunk_hooked(model: Any, encoders: list[tuple[TextEncoderSpec, Any]], hook: ChunkHook) -> Iterator[None]:
    """Wrap each text wrapper's `process_tokens` (one call per 77-token chunk) by instance; always undone."""
    wrapped = []
    for spec, wrapper in encoders:
        if "process_tokens" in vars(wrapper):
            if type(vars(wrapper)["process_tokens"]).__name__ == "AestheticCLIP":
                raise FinetuneError("the original Aesthetic Gradients extension has replaced the text encoder's "
                                    "process_tokens; disable it in Extensions (the Fine-tune extension replaces "
                                    "it and reads its embeddings folder) and restart the WebUI")
            raise FinetuneError("another text-encoder hook is active on this model; only one can be")
        original = wrapper.process_tokens

        def process_tokens(tokens: Any, multipliers: Any, _original: Any = original, _key: str = spec.key,
                           _wrapper: Any = wrapper) -> Any:
            fixes = _wrapper.hijack.fixes  # set by the WebUI for this chunk; the encoder consumes them
            z = _original(tokens, multipliers)
            pooled = getattr(z, "pooled", None)
            out = hook(_webui_rows(model, _key, _wrapper, tokens, fixes, z))
            if pooled is not None:  # SDXL's CLIP-G wrapper hangs the pooled vector on the tensor
                setattr(out, "pooled", pooled)  # noqa: B010
            return out

        wrapper.process_tokens = process_tokens
        wrapped.append(wrapper)
    try:
        yield
    finally:
        for wrapper in wrapped:
            del wrapper.process_tokens


def _encoder_ids(wrapper: Any, rows: list[list[int]]) -> torch.Tensor:
    """The ids the encoder reads for chunk rows: `process_tokens` pads OpenCLIP rows with 0 after the first end."""
    ids = torch.tensor(rows, dtype=torch.long)
    if wrapper.id_end != wrapper.id_pad:
        for i, row in enumerate(rows):
            ids[i, row.index(wrapper.id_end) + 1:] = wrapper.id_pad
    return ids


def _webui_rows(model: Any, key: str, wrapper: Any, tokens: Any, fixes: Any, z: torch.Tensor) -> ChunkRows:
    """One chunk as `TextChunks`: re-encoding goes through the wrapper's own `encode_with_transformers`."""
    from modules import shared

    inner = wrapper.wrapped
    encoder = inner.transformer if hasattr(inner, "transformer") else inner.model
    ids = _encoder_ids(wrapper, [list(row) for row in tokens])

    def run(rows: torch.Tensor, splice: list[int] | None) -> EncodedText:
        wrapper.hijack.fixes = [fixes[i] for i in splice] if splice is not None and fixes else None
        try:
            with _pooled_capture(inner) as pooled:
                hidden = wrapper.encode_with_transformers(rows)
            return EncodedText(hidden, pooled_at_eos(pooled(), rows, wrapper.id_end))
        finally:
            wrapper.hijack.fixes = None

    def tokenize(text: str) -> list[int]:
        content = list(wrapper.tokenize([text])[0][:wrapper.chunk_length])
        row = [wrapper.id_start, *content] + [wrapper.id_end] * (wrapper.chunk_length + 1 - len(content))
        return _encoder_ids(wrapper, [row])[0].tolist()

    opts = shared.opts
    state = "|".join(str(part) for part in (
        model.family, model.identity.name, model.identity.shorthash, key, type(inner).__name__,
        getattr(inner, "layer", ""), getattr(inner, "layer_idx", ""), getattr(opts, "CLIP_stop_at_last_layers", 1),
        getattr(opts, "sdxl_clip_l_skip", False), next(encoder.parameters()).dtype))
    extras = [";".join(f"{offset}:{emb.name}:{tensor_digest(emb.vec[key] if isinstance(emb.vec, dict) else emb.vec)}"
                       for offset, emb in row) for row in (fixes or [[] for _ in tokens])]
    return ChunkRows(key, ids, z, encoder, run, tokenize, state, extras)


@contextmanager
def _pooled_capture(inner: Any) -> Iterator[Any]:
    """While active, record what the encoder's last layer (and final layer norm) give; yields a function that
    returns the (N, 77, C) states after the last layer and the final layer norm. transformers' CLIP returns them as
    `last_hidden_state`; OpenCLIP's SD2 embedder stops before its last block, so that block is run on what its
    `ln_final` received (ldm runs the blocks sequence-first, as here)."""
    seen: dict[str, Any] = {}
    if hasattr(inner, "transformer"):
        handles = [inner.transformer.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))]
    else:
        clip = inner.model
        last = clip.transformer.resblocks[-1]
        handles = [last.register_forward_hook(lambda m, i, o: seen.__setitem__("last", o)),
                   clip.ln_final.register_forward_pre_hook(lambda m, i: seen.__setitem__("ln_in", i[0]))]

    def states() -> torch.Tensor:
        if "out" in seen:
            return seen["out"].last_hidden_state
        if "last" in seen:
            final = seen["last"].permute(1, 0, 2)
        else:
            final = last(seen["ln_in"].permute(1, 0, 2), attn_mask=clip.attn_mask).permute(1, 0, 2)
        return clip.ln_final(final)

    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()
