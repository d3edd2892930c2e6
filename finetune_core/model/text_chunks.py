"""`TextChunks` as both backends hand it to a generation-time hook: the rows, and a way to run them again with some
of the encoder's parameters replaced (torch.func.functional_call), so a hook can optimise copies of only what it
needs while the model's own weights stay untouched."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence

import torch

from finetune_core.model.interface import EncodedText

# run(ids on the encoder's device, the batch rows whose embeddings go into them (None: nothing spliced))
Run = Callable[[torch.Tensor, "list[int] | None"], EncodedText]
# Parameters `encode` never reads for its outputs: the projection to CLIP's joint space, CLIP's logit scale.
_NOT_READ = {"text_projection", "logit_scale"}


class _Reparametrized(torch.nn.Module):
    """Holds the encoder as a submodule so functional_call can swap its parameters around `run`."""

    def __init__(self, encoder: torch.nn.Module, run: Run) -> None:
        super().__init__()
        self.encoder = encoder
        self._run = run

    def forward(self, ids: torch.Tensor, splice: list[int] | None) -> EncodedText:
        return self._run(ids, splice)


class ChunkRows:
    """The rows one encoder encodes in one call (see `TextChunks`).

    state: what else decides the encoder's output (model identity, conditioning layer); row_extras: per row, what
    is spliced into it (embedding names and a digest of their vectors).
    """

    def __init__(self, key: str, tokens: torch.Tensor, hidden: torch.Tensor, encoder: torch.nn.Module, run: Run,
                 tokenize: Callable[[str], list[int]], state: str, row_extras: list[str]) -> None:
        self.key = key
        self.tokens = tokens.detach().to("cpu", torch.long)
        self.hidden = hidden
        self._encoder = encoder
        self._run = run
        self._tokenize = tokenize
        self._state = state
        self._row_extras = row_extras
        self._device = hidden.device
        self._table_module = vocabulary_table(encoder)
        self.token_table = next(name for name, p in encoder.named_parameters() if p is self._table_module.weight)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self._encoder.named_parameters()
                if not _NOT_READ.intersection(name.split("."))}

    def encode(self, params: Mapping[str, torch.Tensor] | None = None, rows: Sequence[int] | None = None,
               ids: torch.Tensor | None = None,
               token_rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> EncodedText:
        splice: list[int] | None = None
        if ids is None:
            splice = list(range(self.tokens.shape[0])) if rows is None else [int(i) for i in rows]
            ids = self.tokens[splice]
        ids = ids.to(self._device)
        handle = None if token_rows is None else self._table_module.register_forward_hook(_replacing(*token_rows))
        try:
            if not params:
                return self._run(ids, splice)
            holder = _Reparametrized(self._encoder, self._run)
            renamed = {f"encoder.{name}": value for name, value in params.items()}
            out: EncodedText = torch.func.functional_call(holder, renamed, (ids, splice))
            return out
        finally:
            if handle is not None:
                handle.remove()

    def tokenize(self, text: str) -> torch.Tensor:
        return torch.tensor([self._tokenize(text)], dtype=torch.long)

    def row_keys(self) -> list[str]:
        keys = []
        for row, extra in zip(self.tokens, self._row_extras):
            digest = hashlib.sha256(self._state.encode())
            digest.update(row.numpy().tobytes())
            digest.update(extra.encode())
            keys.append(digest.hexdigest())
        return keys


def vocabulary_table(encoder: torch.nn.Module) -> torch.nn.Embedding:
    """The encoder's token-embedding table: its embedding layer with the most rows (positions have 77)."""
    tables = [m for m in encoder.modules() if isinstance(m, torch.nn.Embedding)]
    if not tables:
        raise TypeError(f"{type(encoder).__name__} has no token embedding layer")
    return max(tables, key=lambda m: m.weight.shape[0])


def _replacing(vocab_ids: torch.Tensor, vectors: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A forward hook on the token table: looked-up rows of `vocab_ids` become `vectors` (rows not asked for, and
    the table itself, are left as they are)."""
    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        match = inputs[0].unsqueeze(-1) == vocab_ids.to(inputs[0].device)  # (N, L, k)
        found = match.any(-1, keepdim=True)
        chosen = vectors.to(out.device, out.dtype)[match.int().argmax(-1)]
        return torch.where(found, chosen, out)
    return hook


def tensor_digest(tensor: torch.Tensor) -> str:
    """A short digest of a tensor's values (spliced embedding vectors are small: a few rows of 768-2048)."""
    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def first_eos(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per row, the position of the first end-of-text id (CLIP pools there; SD1 also pads with it)."""
    return (ids == eos_id).int().argmax(dim=-1)


def pooled_at_eos(states: torch.Tensor, ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(N, C): each row's state at its first end-of-text token."""
    rows = torch.arange(states.shape[0], device=states.device)
    return states[rows, first_eos(ids, eos_id).to(states.device)]
