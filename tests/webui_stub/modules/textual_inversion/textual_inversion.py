"""Stand-in for modules/textual_inversion/textual_inversion.py: Embedding and EmbeddingDatabase."""

from __future__ import annotations

import os

import safetensors.torch
import torch

from modules import devices, shared


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec = vec
        self.name = name
        self.step = step
        self.shape = None
        self.vectors = 0
        self.cached_checksum = None
        self.sd_checkpoint = None
        self.sd_checkpoint_name = None
        self.optimizer_state_dict = None
        self.filename = None
        self.hash = None
        self.shorthash = None


class EmbeddingDatabase:
    def __init__(self):
        self.ids_lookup = {}
        self.word_embeddings = {}
        self.skipped_embeddings = {}
        self.expected_shape = -1
        self.embedding_dirs = {}
        self.load_calls: list[bool] = []  # test aid: force_reload of every load call

    def add_embedding_dir(self, path):
        self.embedding_dirs[path] = path

    def clear_embedding_dirs(self):
        self.embedding_dirs.clear()

    def register_embedding(self, embedding, model):
        return self.register_embedding_by_name(embedding, model, embedding.name)

    def register_embedding_by_name(self, embedding, model, name):
        ids = model.cond_stage_model.tokenize([name])[0]
        first_id = ids[0]
        lookup = [x for x in self.ids_lookup.get(first_id, []) if x[1].name != name]
        if embedding is not None:
            lookup.append((ids, embedding))
        self.ids_lookup[first_id] = sorted(lookup, key=lambda x: len(x[0]), reverse=True)
        if embedding is None:
            self.word_embeddings.pop(name, None)
            if not self.ids_lookup[first_id]:
                del self.ids_lookup[first_id]
            return None
        self.word_embeddings[name] = embedding
        return embedding

    def get_expected_shape(self):
        vec = shared.sd_model.cond_stage_model.encode_embedding_init_text(",", 1)
        return vec.shape[1]

    def load_from_file(self, path, filename):
        name, ext = os.path.splitext(filename)
        if ext.lower() == ".safetensors":
            data = safetensors.torch.load_file(path, device="cpu")
        else:
            data = torch.load(path, map_location="cpu")
        if "string_to_param" in data:
            vec = next(iter(data["string_to_param"].values()))
        elif "clip_g" in data and "clip_l" in data:
            vec = {k: v.detach().to(devices.device, dtype=torch.float32) for k, v in data.items()}
        else:
            vec = next(iter(data.values()))
        embedding = Embedding(vec if isinstance(vec, dict) else vec.detach().to(devices.device, torch.float32),
                              name, data.get("step") if isinstance(data.get("step"), int) else None)
        if isinstance(vec, dict):
            embedding.shape = vec["clip_l"].shape[-1] + vec["clip_g"].shape[-1]
            embedding.vectors = vec["clip_g"].shape[0]
        else:
            embedding.shape = vec.shape[-1]
            embedding.vectors = vec.shape[0] if vec.dim() > 1 else 1
        embedding.filename = path
        if self.expected_shape == -1 or self.expected_shape == embedding.shape:
            self.register_embedding(embedding, shared.sd_model)
        else:
            self.skipped_embeddings[name] = embedding

    def load_textual_inversion_embeddings(self, force_reload=False, sync_with_sd_model=True):
        self.load_calls.append(force_reload)
        self.ids_lookup.clear()
        self.word_embeddings.clear()
        self.skipped_embeddings.clear()
        self.expected_shape = self.get_expected_shape()
        for root in self.embedding_dirs:
            for dirpath, _, files in os.walk(root):
                for f in sorted(files):
                    if f.lower().endswith((".pt", ".bin", ".safetensors")):
                        self.load_from_file(os.path.join(dirpath, f), f)

    def find_embedding_at_position(self, tokens, offset):
        token = tokens[offset]
        for ids, embedding in self.ids_lookup.get(token, []):
            if tokens[offset:offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None
