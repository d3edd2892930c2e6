from pathlib import Path

import torch

from finetune_core.data.cache import LatentCache, TextCache, latent_key
from finetune_core.data.transforms import CropPlan
from finetune_core.model.interface import LatentMoments, ModelIdentity, TextConditioning

PLAN = CropPlan(64, 64, 0, 0, 64, 64)


def test_key_changes_with_every_part():
    base = latent_key("abc", PLAN, False, "vae1")
    assert base == latent_key("abc", PLAN, False, "vae1")
    variants = [latent_key("abd", PLAN, False, "vae1"),
                latent_key("abc", CropPlan(128, 64, 0, 0, 64, 64), False, "vae1"),
                latent_key("abc", CropPlan(128, 64, 32, 0, 64, 64), False, "vae1"),
                latent_key("abc", PLAN, True, "vae1"), latent_key("abc", PLAN, False, "vae2")]
    assert len({base, *variants}) == 6


def test_disk_cache_round_trip_and_damaged_file(tmp_path: Path):
    moments = LatentMoments(torch.rand(1, 4, 2, 2), torch.rand(1, 4, 2, 2))
    LatentCache(tmp_path).put("k", moments)
    fresh = LatentCache(tmp_path)
    got = fresh.get("k")
    assert got is not None and torch.equal(got.mean, moments.mean) and fresh.hits == 1
    (tmp_path / "k.safetensors").write_bytes(b"damaged")
    again = LatentCache(tmp_path)
    assert again.get("k") is None and again.misses == 1


class _TextModel:
    def __init__(self, shorthash: str) -> None:
        self.identity = ModelIdentity("fake", shorthash)
        self.calls: list[list[str]] = []

    def encode_prompts(self, prompts):
        self.calls.append(list(prompts))
        return TextConditioning(torch.stack([torch.full((77, 8), float(len(p))) for p in prompts]))


def test_text_cache_hits_per_encoder_and_prompt():
    cache, model = TextCache(), _TextModel("a")
    first = cache.encode(model, ["ab", "abc", "ab"])
    assert first.context.shape == (3, 77, 8) and float(first.context[1, 0, 0]) == 3.0
    assert model.calls == [["ab"], ["abc"]]
    cache.encode(model, ["abc"])
    assert len(model.calls) == 2 and cache.hits == 2
    other = _TextModel("b")
    cache.encode(other, ["abc"])
    assert other.calls == [["abc"]]
