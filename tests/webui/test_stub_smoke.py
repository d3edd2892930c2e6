"""The stand-in itself behaves like the WebUI: chunks, embeddings spliced through hijack.fixes, lowvram hooks."""

from __future__ import annotations

import torch


def test_cond_stage_model_gives_77_token_chunks(sd1):
    z = sd1.get_learned_conditioning(["a photo of a cat", " ".join(["dog"] * 80)])
    assert z.shape == (2, 154, 768)
    assert torch.isfinite(z).all()


def test_registered_embedding_changes_the_conditioning(sd1, webui):
    from modules import sd_hijack
    from modules.textual_inversion.textual_inversion import Embedding

    before = sd1.cond_stage_model(["a photo of zzqx"])
    emb = Embedding(torch.randn(2, 768), "zzqx")
    emb.vectors, emb.shape = 2, 768
    sd_hijack.model_hijack.embedding_db.register_embedding(emb, sd1)
    after = sd1.cond_stage_model(["a photo of zzqx"])
    assert not torch.allclose(before, after)
