"""Stand-in for modules/sd_hijack_clip.py: 75-token chunks, embeddings via hijack.fixes, emphasis, clip skip."""

from __future__ import annotations

import math
from collections import namedtuple

import torch

from modules import devices, prompt_parser, shared

PromptChunkFix = namedtuple("PromptChunkFix", ["offset", "embedding"])


class PromptChunk:
    def __init__(self):
        self.tokens = []
        self.multipliers = []
        self.fixes = []


class FrozenCLIPEmbedderWithCustomWordsBase(torch.nn.Module):
    def __init__(self, wrapped, hijack):
        super().__init__()
        self.wrapped = wrapped
        self.hijack = hijack
        self.chunk_length = 75
        self.is_trainable = getattr(wrapped, "is_trainable", False)
        self.input_key = getattr(wrapped, "input_key", "txt")
        self.legacy_ucg_val = None

    def empty_chunk(self):
        chunk = PromptChunk()
        chunk.tokens = [self.id_start] + [self.id_end] * (self.chunk_length + 1)
        chunk.multipliers = [1.0] * (self.chunk_length + 2)
        return chunk

    def get_target_prompt_token_count(self, token_count):
        return math.ceil(max(token_count, 1) / self.chunk_length) * self.chunk_length

    def tokenize_line(self, line):
        parsed = prompt_parser.parse_prompt_attention(line) if shared.opts.emphasis != "None" else [[line, 1.0]]
        tokenized = self.tokenize([text for text, _ in parsed])
        chunks, chunk, token_count = [], PromptChunk(), 0

        def next_chunk(is_last=False):
            nonlocal token_count, chunk
            token_count += len(chunk.tokens) if is_last else self.chunk_length
            to_add = self.chunk_length - len(chunk.tokens)
            if to_add > 0:
                chunk.tokens += [self.id_end] * to_add
                chunk.multipliers += [1.0] * to_add
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end]
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0]
            chunks.append(chunk)
            chunk = PromptChunk()

        for tokens, (text, weight) in zip(tokenized, parsed):
            if text == "BREAK" and weight == -1:
                next_chunk()
                continue
            position = 0
            while position < len(tokens):
                if len(chunk.tokens) == self.chunk_length:
                    next_chunk()
                embedding, embedding_length = self.hijack.embedding_db.find_embedding_at_position(tokens, position)
                if embedding is None:
                    chunk.tokens.append(tokens[position])
                    chunk.multipliers.append(weight)
                    position += 1
                    continue
                emb_len = int(embedding.vectors)
                if len(chunk.tokens) + emb_len > self.chunk_length:
                    next_chunk()
                chunk.fixes.append(PromptChunkFix(len(chunk.tokens), embedding))
                chunk.tokens += [0] * emb_len
                chunk.multipliers += [weight] * emb_len
                position += embedding_length
        if chunk.tokens or not chunks:
            next_chunk(is_last=True)
        return chunks, token_count

    def process_texts(self, texts):
        token_count, cache, batch_chunks = 0, {}, []
        for line in texts:
            if line not in cache:
                cache[line], count = self.tokenize_line(line)
                token_count = max(count, token_count)
            batch_chunks.append(cache[line])
        return batch_chunks, token_count

    def forward(self, texts):
        batch_chunks, _ = self.process_texts(texts)
        chunk_count = max(len(x) for x in batch_chunks)
        zs = []
        for i in range(chunk_count):
            batch_chunk = [chunks[i] if i < len(chunks) else self.empty_chunk() for chunks in batch_chunks]
            self.hijack.fixes = [x.fixes for x in batch_chunk]
            zs.append(self.process_tokens([x.tokens for x in batch_chunk], [x.multipliers for x in batch_chunk]))
        if getattr(self.wrapped, "return_pooled", False):
            return torch.hstack(zs), zs[0].pooled
        return torch.hstack(zs)

    def process_tokens(self, remade_batch_tokens, batch_multipliers):
        tokens = torch.asarray(remade_batch_tokens).to(devices.device)
        # SD2/SDXL-G pad with 0 after the first end token; SD1 pads with the end token itself.
        if self.id_end != self.id_pad:
            for batch_pos in range(len(remade_batch_tokens)):
                index = remade_batch_tokens[batch_pos].index(self.id_end)
                tokens[batch_pos, index + 1:tokens.shape[1]] = self.id_pad
        z = self.encode_with_transformers(tokens)
        pooled = getattr(z, "pooled", None)
        if shared.opts.emphasis == "Original":
            multipliers = torch.asarray(batch_multipliers).to(z.device)
            original_mean = z.mean()
            z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape).to(z.dtype)
            z = z * (original_mean / z.mean())
        if pooled is not None:
            z.pooled = pooled
        return z


class FrozenCLIPEmbedderWithCustomWords(FrozenCLIPEmbedderWithCustomWordsBase):
    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self.tokenizer = wrapped.tokenizer
        vocab = self.tokenizer.get_vocab()
        self.comma_token = vocab.get(",</w>", None)
        self.id_start = self.tokenizer.bos_token_id
        self.id_end = self.tokenizer.eos_token_id
        self.id_pad = self.id_end

    def tokenize(self, texts):
        return self.wrapped.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):
        skip = shared.opts.CLIP_stop_at_last_layers
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=-skip)
        if skip > 1:
            z = outputs.hidden_states[-skip]
            z = self.wrapped.transformer.text_model.final_layer_norm(z)
        else:
            z = outputs.last_hidden_state
        return z

    def encode_embedding_init_text(self, init_text, nvpt):
        embedding_layer = self.wrapped.transformer.text_model.embeddings
        ids = self.wrapped.tokenizer(init_text, max_length=nvpt, return_tensors="pt", add_special_tokens=False)
        weight = embedding_layer.token_embedding.wrapped.weight
        return embedding_layer.token_embedding.wrapped(ids["input_ids"].to(weight.device)).squeeze(0)


class FrozenCLIPEmbedderForSDXLWithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    def encode_with_transformers(self, tokens):
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=self.wrapped.layer == "hidden")
        if self.wrapped.layer == "last":
            z = outputs.last_hidden_state
        else:
            z = outputs.hidden_states[self.wrapped.layer_idx]
        if getattr(self.wrapped, "return_pooled", False):
            z.pooled = outputs.pooler_output
        return z
