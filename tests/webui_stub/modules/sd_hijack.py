"""Stand-in for modules/sd_hijack.py: the model_hijack singleton and EmbeddingsWithFixes."""

from __future__ import annotations

import torch

from modules import devices, shared
from modules.textual_inversion.textual_inversion import EmbeddingDatabase

optimization_calls: list[str] = []  # test aid


class StableDiffusionModelHijack:
    fixes = None
    layers = None
    circular_enabled = False
    clip = None
    optimization_method = None

    def __init__(self):
        self.extra_generation_params = {}
        self.comments = []
        self.embedding_db = EmbeddingDatabase()
        self.embedding_db.add_embedding_dir(shared.cmd_opts.embeddings_dir)

    def hijack(self, m):
        from modules import sd_hijack_clip, sd_hijack_open_clip
        if hasattr(m, "conditioner"):
            text_cond_models = []
            for i, embedder in enumerate(m.conditioner.embedders):
                kind = type(embedder).__name__
                if kind == "FrozenCLIPEmbedder":
                    emb = embedder.transformer.text_model.embeddings
                    emb.token_embedding = EmbeddingsWithFixes(emb.token_embedding, self)
                    m.conditioner.embedders[i] = sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords(embedder, self)
                    text_cond_models.append(m.conditioner.embedders[i])
                elif kind == "FrozenOpenCLIPEmbedder2":
                    embedder.model.token_embedding = EmbeddingsWithFixes(embedder.model.token_embedding, self,
                                                                         textual_inversion_key="clip_g")
                    m.conditioner.embedders[i] = sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords(embedder,
                                                                                                             self)
                    text_cond_models.append(m.conditioner.embedders[i])
            m.cond_stage_model = text_cond_models[0] if len(text_cond_models) == 1 else m.conditioner
        elif type(m.cond_stage_model).__name__ == "FrozenOpenCLIPEmbedder":
            m.cond_stage_model.model.token_embedding = EmbeddingsWithFixes(m.cond_stage_model.model.token_embedding,
                                                                           self)
            m.cond_stage_model = sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords(m.cond_stage_model, self)
        else:
            emb = m.cond_stage_model.transformer.text_model.embeddings
            emb.token_embedding = EmbeddingsWithFixes(emb.token_embedding, self)
            m.cond_stage_model = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(m.cond_stage_model, self)
        self.clip = m.cond_stage_model

    def undo_hijack(self, m):
        pass

    def apply_optimizations(self, option=None):
        optimization_calls.append("apply")

    def clear_comments(self):
        self.comments = []
        self.extra_generation_params = {}


def apply_optimizations(option=None):
    optimization_calls.append("apply")


def undo_optimizations():
    optimization_calls.append("undo")


class EmbeddingsWithFixes(torch.nn.Module):
    def __init__(self, wrapped, embeddings, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.textual_inversion_key = textual_inversion_key
        self.weight = self.wrapped.weight

    def forward(self, input_ids):
        batch_fixes = self.embeddings.fixes
        self.embeddings.fixes = None
        inputs_embeds = self.wrapped(input_ids)
        if not batch_fixes or max(len(x) for x in batch_fixes) == 0:
            return inputs_embeds
        vecs = []
        for fixes, tensor in zip(batch_fixes, inputs_embeds):
            for offset, embedding in fixes:
                vec = embedding.vec[self.textual_inversion_key] if isinstance(embedding.vec, dict) else embedding.vec
                emb = devices.cond_cast_unet(vec)
                emb_len = min(tensor.shape[0] - offset - 1, emb.shape[0])
                tensor = torch.cat([tensor[0:offset + 1], emb[0:emb_len], tensor[offset + 1 + emb_len:]])
                tensor = tensor.to(dtype=inputs_embeds.dtype)
            vecs.append(tensor)
        return torch.stack(vecs)


model_hijack = None  # built by new_model_hijack() once the test has filled cmd_opts (the WebUI builds it at import)


def new_model_hijack():
    """Test aid: a fresh hijack singleton (after shared.reset)."""
    global model_hijack
    model_hijack = StableDiffusionModelHijack()
    return model_hijack
