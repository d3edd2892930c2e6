"""The CLIP tokenizer gives the same ids as open_clip's own SimpleTokenizer."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from finetune_core.model.tokenizer import ClipTokenizer, bpe_vocab_path

PROMPTS = [
    "a photo of a cat",
    "Café crème brûlée, naïve façade",
    "東京の夜景, 漢字 and 한국어",
    "a dog 🐶🚀 with emoji ❤️",
    "(masterpiece:1.2), [bad hands], <lora:x:1>, {{best quality}}",
    "price: $1,234.56 — 50% off!!! ... ?!",
    "year 2024, 3.14159, 1e-5, #hashtag @user",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &amp;amp;",
    "  lots \t of\n\n   whitespace   runs  ",
    "it's they're we've I'm you'll he'd DON'T",
    "",
    "sks person, " * 40,
    "a very long prompt " + " ".join(f"word{i} detail{i}" for i in range(60)),
]


@pytest.fixture(scope="module")
def reference():
    """open_clip's SimpleTokenizer, loaded by file path because `import open_clip` needs torchvision."""
    path = bpe_vocab_path().parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.mark.parametrize("text", PROMPTS)
def test_same_ids_as_open_clip(tokenizer: ClipTokenizer, reference, text: str) -> None:
    assert tokenizer.encode(text) == reference.encode(text)


def test_long_prompt_is_longer_than_one_chunk(tokenizer: ClipTokenizer) -> None:
    assert len(tokenizer.encode(PROMPTS[-1])) > 77


def test_special_ids_and_vocab_size(tokenizer: ClipTokenizer) -> None:
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (49406, 49407, 49408)
    assert tokenizer.encode("<|startoftext|>a<|endoftext|>")[0] == 49406


def test_decode_round_trips_cleaned_text(tokenizer: ClipTokenizer, reference) -> None:
    for text in PROMPTS[:6]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == reference.decode(ids)
    assert tokenizer.decode(tokenizer.encode("Café 🐶 cat")).strip() == "café 🐶 cat"


def test_cache_is_per_instance(tokenizer: ClipTokenizer) -> None:
    other = ClipTokenizer(Path(bpe_vocab_path()))
    tokenizer.encode("zebracorn")
    assert "zebracorn" not in other._cache and "zebracorn" in tokenizer._cache


def test_missing_open_clip_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_core.errors import FinetuneError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FinetuneError, match="open_clip_torch"):
        bpe_vocab_path()
