"""Aesthetic Gradients at generation time (methods.md §5.2): per prompt chunk, a few Adam steps on copies of the text
encoder's weights raise the cosine similarity between the chunk's projected text feature and the aesthetic
embedding; the hidden states of those weights are then blended into the conditioning.

What differs from the original extension, and why:
- Copies of only the text encoder's own weights are tuned (float32 masters of the model's weights, no vision tower,
  no deep copy of CLIP), and of the token table only the rows the chunk uses: Adam leaves rows whose gradient is
  always zero exactly where they are, so the result is the same. All of it is freed when the chunk is done.
- The result per chunk row is cached by what decides it (the row's ids and spliced embeddings, the model, the
  embedding, steps, learning rate, text options), so a repeated prompt costs a dictionary lookup; the blend
  (weight, slerp) is applied afresh each time. Each row is optimised on its own, so a prompt's result does not
  depend on what else is in the batch, and nothing random is drawn: the result is the same for every seed.
- The chunk's ids are used as the encoder reads them (the original prepends a second start token and drops the
  last one), and empty chunks (an empty negative prompt) are left alone unless asked.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from finetune_core.model.interface import TextChunks

CACHE_ROWS = 256  # personalised chunk rows kept (77 x C each: about 50 MiB at SDXL's widest in fp16)


@dataclass(frozen=True)
class AestheticTarget:
    """An aesthetic embedding ready to apply: the normalised image direction (1, D), the CLIP text projection
    (C, D) into the same space, and a digest of both (part of every cache key)."""

    name: str
    direction: torch.Tensor
    projection: torch.Tensor
    digest: str

    @staticmethod
    def of(name: str, vector: torch.Tensor, projection: torch.Tensor) -> AestheticTarget:
        direction = vector.detach().float().reshape(1, -1)
        direction = direction / direction.norm(dim=-1, keepdim=True)  # both consumers normalise at load
        projection = projection.detach().float()
        digest = hashlib.sha256(direction.numpy().tobytes() + projection.numpy().tobytes()).hexdigest()[:16]
        return AestheticTarget(name, direction, projection, digest)

    @property
    def text_width(self) -> int:
        return int(self.projection.shape[0])


@dataclass(frozen=True)
class Personalization:
    """The per-generation options (the original's names): blend weight and mode, optimisation steps and rate,
    the steering text and whether it is a negative one, the slerp angle toward it, and empty chunks."""

    weight: float = 0.9
    steps: int = 5
    lr: float = 0.0001
    slerp: bool = False
    text: str = ""
    text_negative: bool = False
    slerp_angle: float = 0.1
    empty_prompts: bool = False

    @property
    def active(self) -> bool:
        """Any of weight, steps or rate at zero leaves the conditioning exactly as it was (as the original)."""
        return self.weight != 0 and self.steps != 0 and self.lr != 0

    def optimisation_key(self) -> str:
        """What decides the personalised hidden states (the blend does not)."""
        return repr((self.steps, float(self.lr), self.text, self.text_negative, float(self.slerp_angle)))


class ConditioningCache:
    """Personalised chunk rows by key, least recently used dropped first; `optimisations` counts rows computed."""

    def __init__(self, capacity: int = CACHE_ROWS) -> None:
        self.capacity = capacity
        self._rows: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.optimisations = 0

    def get(self, key: str) -> torch.Tensor | None:
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
        return row

    def put(self, key: str, row: torch.Tensor) -> None:
        self._rows[key] = row
        self._rows.move_to_end(key)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)

    def clear(self) -> None:
        self._rows.clear()

    def __len__(self) -> int:
        return len(self._rows)


class PersonalizedText:
    """The chunk hook (`DiffusionModel.text_chunk_hook`) that applies one aesthetic embedding.

    It acts on the encoder whose width is the embedding's text width (SDXL: CLIP-L for a ViT-L/14 embedding,
    OpenCLIP-G for a bigG one) and passes the other through. `context` joins the cache keys: what the host knows
    changes the encoder's weights without changing the model (the WebUI: LoRAs applied to the text encoder).
    """

    def __init__(self, target: AestheticTarget, options: Personalization, cache: ConditioningCache,
                 context: str = "") -> None:
        self.target = target
        self.options = options
        self.cache = cache
        self._salt = "|".join((target.digest, options.optimisation_key(), context))

    def __call__(self, chunks: TextChunks) -> torch.Tensor:
        hidden = chunks.hidden
        if not self.options.active or hidden.shape[-1] != self.target.text_width:
            return hidden
        rows = self._rows_to_change(chunks)
        if not rows:
            return hidden
        keys = [self._key(k) for k in chunks.row_keys()]
        for i in rows:
            if self.cache.get(keys[i]) is None:
                self.cache.put(keys[i], self._personalise(chunks, i).to(hidden.dtype))
        personal = torch.stack([self.cache.get(keys[i]) for i in rows])  # type: ignore[misc]
        out = hidden.clone()
        out[rows] = blend(hidden[rows], personal.to(hidden.device), self.options.weight, self.options.slerp)
        return out

    def _key(self, row_key: str) -> str:
        return hashlib.sha256(f"{row_key}|{self._salt}".encode()).hexdigest()

    def _rows_to_change(self, chunks: TextChunks) -> list[int]:
        if self.options.empty_prompts:
            return list(range(chunks.tokens.shape[0]))
        empty = chunks.tokenize("")[0]
        return [i for i, row in enumerate(chunks.tokens) if not torch.equal(row, empty)]

    def _personalise(self, chunks: TextChunks, row: int) -> torch.Tensor:
        """(77, C): the row's hidden states after `steps` Adam steps toward the target (methods.md §5.2)."""
        self.cache.optimisations += 1
        with torch.enable_grad():
            frozen = chunks.parameters()
            target = self._direction(chunks)
            tuned = TunedWeights(frozen, chunks.token_table, chunks.tokens[row])
            optimizer = torch.optim.Adam(tuned.masters(), lr=self.options.lr)
            for _ in range(self.options.steps):
                encoded = chunks.encode(tuned.weights(), rows=[row], token_rows=tuned.token_rows())
                loss = -self._similarity(encoded.pooled, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                encoded = chunks.encode(tuned.weights(), rows=[row], token_rows=tuned.token_rows())
                personal = encoded.hidden[0].detach()
            del optimizer, tuned
        return personal

    def _similarity(self, pooled: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        features = pooled.float() @ self.target.projection.to(pooled.device)
        features = features / features.norm(dim=-1, keepdim=True)
        return (features @ target.to(features.device).T).mean()

    def _direction(self, chunks: TextChunks) -> torch.Tensor:
        """The image direction, turned toward (or, negative, away from) the steering text's feature by the slerp
        angle, exactly as the original computes it (the text feature is not normalised there)."""
        direction = self.target.direction
        if not self.options.text:
            return direction
        with torch.no_grad():
            pooled = chunks.encode(ids=chunks.tokenize(self.options.text)).pooled
        text = pooled.float().cpu() @ self.target.projection
        if self.options.text_negative:
            text = direction - text
            text = text / text.norm(dim=-1, keepdim=True)
        return slerp(direction, text, self.options.slerp_angle)


class TunedWeights:
    """float32 master copies of the encoder's weights for one row's optimisation.

    The token table gets masters only for the rows the chunk's ids use, passed as replacement rows rather than a
    copy of the table: every other row would see a zero gradient at every step, for which Adam's update is exactly
    zero.
    """

    def __init__(self, frozen: Mapping[str, torch.Tensor], table: str, ids: torch.Tensor) -> None:
        self._frozen = {name: p for name, p in frozen.items() if name != table}
        weight = frozen[table]
        self._used = torch.unique(ids).to(weight.device)
        self._rows = weight.detach()[self._used].float().clone().requires_grad_(True)
        self._masters = {name: p.detach().float().clone().requires_grad_(True) for name, p in self._frozen.items()}

    def masters(self) -> list[torch.Tensor]:
        return [*self._masters.values(), self._rows]

    def weights(self) -> dict[str, torch.Tensor]:
        """The encoder's weights with the masters in, in the encoder's own dtype (differentiable in the masters)."""
        return {name: master.to(self._frozen[name].dtype) for name, master in self._masters.items()}

    def token_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._used, self._rows


def blend(z: torch.Tensor, personal: torch.Tensor, weight: float, use_slerp: bool) -> torch.Tensor:
    """(1 - w) z + w z', or the original's slerp (which normalises along the token axis of (N, 77, C))."""
    a, b = z.float(), personal.float()
    mixed = slerp(a, b, weight) if use_slerp else a * (1 - weight) + b * weight
    return mixed.to(z.dtype)


def slerp(low: torch.Tensor, high: torch.Tensor, t: float) -> torch.Tensor:
    """The original extension's slerp along dim 1; where the two are (nearly) parallel it interpolates linearly
    instead of dividing by zero."""
    low_n = low / low.norm(dim=1, keepdim=True)
    high_n = high / high.norm(dim=1, keepdim=True)
    omega = torch.acos((low_n * high_n).sum(1).clamp(-1.0, 1.0))
    so = torch.sin(omega)
    safe = so.abs() > 1e-6
    so_safe = torch.where(safe, so, torch.ones_like(so))
    w_low = torch.where(safe, torch.sin((1.0 - t) * omega) / so_safe, torch.full_like(so, 1.0 - t))
    w_high = torch.where(safe, torch.sin(t * omega) / so_safe, torch.full_like(so, t))
    return w_low.unsqueeze(1) * low + w_high.unsqueeze(1) * high
