"""The contract every `DiffusionModel` backend passes, run here on the three tiny diffusers models.

The tests use only the interface and a `model` fixture, so another backend reuses them by importing the
`test_*` functions into its own module and defining its own `model` fixture there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune_core.model.interface import (
    EPSILON,
    SD1,
    SD2,
    SDXL,
    V_PREDICTION,
    AdapterTarget,
    DiffusionModel,
    SampleRequest,
    TextChunks,
    TrainableEmbedding,
    TrainingSetup,
)

CONTEXT_WIDTH = {SD1: 768, SD2: 1024, SDXL: 2048}
LONG_PROMPT = "a photo of " + ", ".join(f"tag{i} detail" for i in range(20))
NAME = "zqxemb"


@pytest.fixture(scope="module", params=["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def model(request: pytest.FixtureRequest) -> DiffusionModel:
    from finetune_core.model.tiny import build_tiny

    return build_tiny(request.param)


def make_embedding(model: DiffusionModel, n_vectors: int = 2, seed: int = 0) -> TrainableEmbedding:
    generator = torch.Generator().manual_seed(seed)
    vectors = {spec.key: (0.05 * torch.randn(n_vectors, spec.width, generator=generator)).requires_grad_()
               for spec in model.text_encoders}
    return TrainableEmbedding(NAME, vectors)


def latents_for(model: DiffusionModel, batch: int = 2, size: int = 64) -> torch.Tensor:
    cells = size // model.vae_scale
    return torch.randn(batch, model.latent_channels, cells, cells, generator=torch.Generator().manual_seed(1))


def test_identity_and_widths(model: DiffusionModel) -> None:
    assert isinstance(model, DiffusionModel)
    assert model.context_width == CONTEXT_WIDTH[model.family] == sum(t.width for t in model.text_encoders)
    assert len(model.identity.shorthash) == 10 and int(model.identity.shorthash, 16) >= 0
    assert model.latent_channels == 4 and model.vae_scale == 8


def test_prediction_type_matches_family(model: DiffusionModel) -> None:
    assert model.prediction_type == (V_PREDICTION if model.family == SD2 else EPSILON)


def test_alphas_cumprod(model: DiffusionModel) -> None:
    ac = model.alphas_cumprod()
    assert ac.shape == (1000,) and ac.dtype == torch.float32 and ac.device.type == "cpu"
    assert bool((ac[1:] < ac[:-1]).all()) and 0 < float(ac[-1]) < float(ac[0]) < 1


def test_encode_prompts_shapes(model: DiffusionModel) -> None:
    with torch.no_grad():
        cond = model.encode_prompts(["a cat", ""])
    assert cond.context.shape == (2, 77, model.context_width)
    if model.family == SDXL:
        assert cond.pooled is not None and cond.pooled.shape == (2, 1280)
    else:
        assert cond.pooled is None
    assert bool(torch.isfinite(cond.context).all())
    assert not torch.equal(cond.context[0], cond.context[1])


def test_long_prompt_takes_two_chunks_and_batch_is_padded(model: DiffusionModel) -> None:
    assert model.count_tokens(LONG_PROMPT) > 75
    with torch.no_grad():
        cond = model.encode_prompts([LONG_PROMPT, "a cat"])
        short = model.encode_prompts(["a cat"])
    assert cond.context.shape == (2, 154, model.context_width)
    # The short prompt's first chunk is what it is alone; its second is an empty chunk.
    torch.testing.assert_close(cond.context[1, :77], short.context[0], rtol=1e-4, atol=1e-5)


def test_count_tokens(model: DiffusionModel) -> None:
    assert model.count_tokens("") == 0
    assert model.count_tokens("a photo of a cat") == 5


def test_token_vectors(model: DiffusionModel) -> None:
    vectors = model.token_vectors("a photo of a cat")
    assert set(vectors) == {t.key for t in model.text_encoders}
    for spec in model.text_encoders:
        assert vectors[spec.key].shape == (5, spec.width) and vectors[spec.key].dtype == torch.float32
    key = model.text_encoders[0].key
    assert torch.equal(vectors[key][1], model.token_vectors("photo")[key][0])


def test_embedding_changes_output_only_where_named(model: DiffusionModel) -> None:
    embedding = make_embedding(model)
    prompts = [f"a photo of {NAME}", "a photo of a cat"]
    with torch.no_grad():
        plain = model.encode_prompts(prompts)
        spliced = model.encode_prompts(prompts, {NAME: embedding})
        other = model.encode_prompts(prompts, {NAME: make_embedding(model, seed=5)})
    assert torch.equal(plain.context[1], spliced.context[1])  # the prompt without the name is untouched
    # CLIP attention is causal: BOS and "a photo of" (positions 0-3) cannot see the embedding at 4-5.
    torch.testing.assert_close(plain.context[0, :4], spliced.context[0, :4], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain.context[0, 4:6], spliced.context[0, 4:6])
    assert not torch.allclose(spliced.context[0, 4:6], other.context[0, 4:6])
    assert model.count_tokens(f"a photo of {NAME}") == len(model.token_vectors(f"a photo of {NAME}")["clip_l"])
    if model.family == SDXL:
        assert torch.equal(plain.pooled[1], spliced.pooled[1])
        assert not torch.allclose(plain.pooled[0], spliced.pooled[0])


def embedding_gradient(model: DiffusionModel, setup: TrainingSetup) -> dict[str, torch.Tensor]:
    """The embedding's gradient from one forward/backward inside a training session with `setup`."""
    embedding = make_embedding(model, n_vectors=3)
    with model.training_session(setup) as session, model.placement(), session.autocast():
        cond = model.encode_prompts([f"{NAME} in a garden", f"a {NAME}"], {NAME: embedding})
        out = model.predict(latents_for(model), torch.tensor([10, 700]), cond)
        out.square().mean().backward()
        for name, module in model.trainable_modules().items():
            assert all(p.grad is None for p in module.parameters()), name  # frozen: no gradient kept
    return {key: vec.grad for key, vec in embedding.vectors.items() if vec.grad is not None}


def test_gradients_reach_only_the_embedding(model: DiffusionModel) -> None:
    grads = embedding_gradient(model, TrainingSetup())
    assert set(grads) == {t.key for t in model.text_encoders}
    assert all(float(g.abs().sum()) > 0 for g in grads.values())


def test_gradient_checkpointing_gives_the_same_gradients(model: DiffusionModel) -> None:
    plain = embedding_gradient(model, TrainingSetup(gradient_checkpointing=False))
    checkpointed = embedding_gradient(model, TrainingSetup(gradient_checkpointing=True))
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-7)


def model_state(model: DiffusionModel) -> list[tuple[str, torch.dtype, bool, bytes]]:
    """Every parameter's name, dtype, requires_grad and bytes, in order."""
    state = []
    for name, module in sorted(model.trainable_modules().items()):
        for key, p in module.named_parameters():
            data = p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
            state.append((f"{name}.{key}", p.dtype, p.requires_grad, data))
    return state


def test_trainable_modules_is_a_query(model: DiffusionModel) -> None:
    before = model_state(model)
    modules = model.trainable_modules()
    expected = {"unet", "text_encoder"} | ({"text_encoder_2"} if model.family == SDXL else set())
    assert set(modules) == expected
    assert model_state(model) == before


def test_training_session_trains_what_it_names_and_restores_everything(model: DiffusionModel) -> None:
    before = model_state(model)
    with pytest.raises(RuntimeError, match="a failing job"):
        with model.training_session(TrainingSetup(train=("unet",), gradient_checkpointing=True)) as session:
            unet = session.modules["unet"]
            assert set(session.modules) == {"unet"}
            assert all(p.requires_grad and p.dtype == torch.float32 for p in unet.parameters())
            for name, module in model.trainable_modules().items():
                if name != "unet":
                    assert not any(p.requires_grad for p in module.parameters()), name
            with model.placement(), session.autocast():
                cond = model.encode_prompts(["a cat", "a dog"])
                model.predict(latents_for(model), torch.tensor([10, 700]), cond).square().mean().backward()
            assert any(p.grad is not None for p in unet.parameters())
            with torch.no_grad():
                for p in unet.parameters():
                    p.add_(1.0)  # an optimizer step
            raise RuntimeError("a failing job")
    assert model_state(model) == before
    assert all(p.grad is None for m in model.trainable_modules().values() for p in m.parameters())


def test_training_session_refuses_a_module_the_model_has_not(model: DiffusionModel) -> None:
    from finetune_core.errors import ModelMismatchError

    with pytest.raises(ModelMismatchError, match="text_encoder_3"):
        with model.training_session(TrainingSetup(train=("text_encoder_3",))):
            pass


def test_session_precision(model: DiffusionModel) -> None:
    with model.training_session(TrainingSetup(precision="bf16")) as session:
        assert session.compute_dtype in (torch.bfloat16, model.dtype)  # bf16 where the device can autocast to it
    with model.training_session(TrainingSetup(precision="fp32")) as session:
        assert session.compute_dtype == model.dtype


def test_text_chunk_hook_sees_every_chunk_and_is_undone(model: DiffusionModel) -> None:
    seen: list[tuple[tuple[int, ...], str]] = []
    first = model.text_encoders[0]

    def shift(chunks: TextChunks) -> torch.Tensor:
        seen.append((tuple(chunks.tokens.shape), chunks.key))
        return chunks.hidden + 1.0 if chunks.key == first.key else chunks.hidden

    with torch.no_grad():
        plain = model.encode_prompts([LONG_PROMPT])
        with model.text_chunk_hook(shift):
            hooked = model.encode_prompts([LONG_PROMPT])
        with pytest.raises(RuntimeError), model.text_chunk_hook(shift):
            raise RuntimeError("a failing generation")
        after = model.encode_prompts([LONG_PROMPT])
    rows = {t.key: sum(shape[0] for shape, key in seen if key == t.key) for t in model.text_encoders}
    assert rows == {t.key: 2 for t in model.text_encoders}  # the long prompt's two chunks, per encoder
    assert all(shape[1:] == (77,) for shape, _ in seen)
    torch.testing.assert_close(hooked.context[..., :first.width], plain.context[..., :first.width] + 1.0)
    torch.testing.assert_close(hooked.context[..., first.width:], plain.context[..., first.width:])
    assert torch.equal(after.context, plain.context)


def chunks_of(model: DiffusionModel, prompts: list[str], embeddings: dict | None = None) -> dict[str, TextChunks]:
    """The TextChunks each encoder hands a hook for `prompts` (the last call per key)."""
    caught: dict[str, TextChunks] = {}

    def keep(chunks: TextChunks) -> torch.Tensor:
        caught[chunks.key] = chunks
        return chunks.hidden

    with torch.no_grad(), model.text_chunk_hook(keep):
        model.encode_prompts(prompts, embeddings)
    return caught


def test_chunks_encode_again_as_the_model_does(model: DiffusionModel) -> None:
    for key, chunks in chunks_of(model, ["a photo of a cat", "a red house"]).items():
        with torch.no_grad():
            again = chunks.encode()
            alone = chunks.encode(ids=chunks.tokenize("a red house"))
        width = next(t.width for t in model.text_encoders if t.key == key)
        assert chunks.tokens.shape == (2, 77) and chunks.tokens.dtype == torch.long
        assert again.hidden.shape == (2, 77, width) and again.pooled.shape == (2, width)
        torch.testing.assert_close(again.hidden, chunks.hidden, rtol=1e-4, atol=1e-5)
        assert torch.equal(chunks.tokenize("a red house")[0], chunks.tokens[1])  # the encoder's own padding
        torch.testing.assert_close(alone.hidden[0], again.hidden[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(alone.pooled[0], again.pooled[1], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(again.pooled[0], again.pooled[1])


def test_chunks_encode_with_replaced_parameters_leaves_the_model_alone(model: DiffusionModel) -> None:
    before = model_state(model)
    for chunks in chunks_of(model, ["a photo of a cat"]).values():
        frozen = chunks.parameters()
        assert frozen and not any("text_projection" in name for name in frozen)
        copies = {name: p.detach().float().clone().requires_grad_() for name, p in frozen.items()}
        same = chunks.encode({name: c.to(frozen[name].dtype) for name, c in copies.items()})
        torch.testing.assert_close(same.hidden, chunks.hidden, rtol=1e-4, atol=1e-5)
        (same.pooled.square().sum() + same.hidden.square().sum()).backward()
        reached = [name for name, c in copies.items() if c.grad is not None and float(c.grad.abs().sum()) > 0]
        assert len(reached) > len(copies) // 2  # the pooled output depends on (nearly) every layer
        with torch.no_grad():
            moved = {name: (c + 0.05).to(frozen[name].dtype) for name, c in copies.items()}
            changed = chunks.encode(moved)
        assert not torch.allclose(changed.hidden, chunks.hidden)
        assert not torch.allclose(changed.pooled, same.pooled)
        assert all(p.grad is None for p in frozen.values())
    assert model_state(model) == before


def test_chunks_replace_token_rows_without_touching_the_table(model: DiffusionModel) -> None:
    before = model_state(model)
    for chunks in chunks_of(model, ["a photo of a cat"]).values():
        table = chunks.parameters()[chunks.token_table]
        assert table.shape[0] == 49408
        used = torch.unique(chunks.tokens[0])
        rows = table.detach()[used].float().clone().requires_grad_()
        same = chunks.encode(token_rows=(used, rows))
        torch.testing.assert_close(same.hidden, chunks.hidden, rtol=1e-4, atol=1e-5)
        same.pooled.square().sum().backward()
        assert rows.grad is not None and float(rows.grad.abs().sum()) > 0
        cat = chunks.tokenize("cat")[0, 1]
        with torch.no_grad():
            moved = chunks.encode(token_rows=(cat.reshape(1), rows[used == cat] + 1.0))
        position = int((chunks.tokens[0] == cat).nonzero()[0, 0])
        assert torch.equal(moved.hidden[0, :position], same.hidden[0, :position])  # causal: before "cat" unchanged
        assert not torch.allclose(moved.hidden[0, position:], same.hidden[0, position:])
        assert table.grad is None
    assert model_state(model) == before


def test_chunks_splice_embeddings_and_key_rows_by_what_decides_them(model: DiffusionModel) -> None:
    prompts = [f"a photo of {NAME}", "a red house"]
    one = chunks_of(model, prompts, {NAME: make_embedding(model)})
    other = chunks_of(model, prompts, {NAME: make_embedding(model, seed=5)})
    again = chunks_of(model, prompts, {NAME: make_embedding(model)})
    for key, chunks in one.items():
        with torch.no_grad():
            spliced = chunks.encode()
            unspliced = chunks.encode(ids=chunks.tokens[:1])
            first, second = chunks.encode(rows=[0]), chunks.encode(rows=[1])
        torch.testing.assert_close(spliced.hidden, chunks.hidden, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(first.hidden[0], chunks.hidden[0], rtol=1e-4, atol=1e-5)  # its own vectors
        torch.testing.assert_close(second.pooled[0], spliced.pooled[1], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(spliced.hidden[0], unspliced.hidden[0])  # the slots hold the vectors
        keys, other_keys = chunks.row_keys(), other[key].row_keys()
        assert keys == again[key].row_keys() and len(set(keys)) == 2
        assert keys[0] != other_keys[0] and keys[1] == other_keys[1]  # only the row naming the embedding differs


def test_decode_with_gradients_reaches_the_latents(model: DiffusionModel) -> None:
    latents = latents_for(model, batch=1).requires_grad_()
    with model.training_session(TrainingSetup()), model.placement():
        model.decode_latents(latents, grad=True).mean().backward()
        assert latents.grad is not None and float(latents.grad.abs().sum()) > 0
        assert not model.decode_latents(latents).requires_grad


def _decode_backward(model: DiffusionModel, setup: TrainingSetup) -> tuple[torch.Tensor, int]:
    """(gradient at the latents, bytes the decode kept for backward outside any checkpointed block)."""
    latents = latents_for(model, batch=1).requires_grad_()
    kept = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept[0] += tensor.numel() * tensor.element_size()
        return tensor

    with model.training_session(setup), model.placement():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            pixels = model.decode_latents(latents, grad=True)
        (pixels * torch.linspace(-1, 1, pixels.numel()).reshape(pixels.shape)).sum().backward()
    assert latents.grad is not None
    return latents.grad, kept[0]


def test_vae_gradient_checkpointing_keeps_less_and_gives_the_same_gradient(model: DiffusionModel) -> None:
    plain, plain_kept = _decode_backward(model, TrainingSetup())
    checkpointed, checkpointed_kept = _decode_backward(model, TrainingSetup(vae_gradient_checkpointing=True))
    torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-7)
    # Inside a checkpointed block nothing is kept for backward (the block runs again there), so the decoder's
    # blocks going through checkpointing shows as fewer bytes kept; the session undoes it on exit.
    assert checkpointed_kept < plain_kept
    assert _decode_backward(model, TrainingSetup())[1] == plain_kept


def test_ldm_state_dict_names_every_weight(model: DiffusionModel) -> None:
    unet = model.ldm_state_dict(("unet",))
    assert unet and all(k.startswith("model.diffusion_model.") for k in unet)
    text = model.ldm_state_dict(("text_encoder",))
    prefix = "conditioner.embedders.0." if model.family == SDXL else "cond_stage_model."
    assert text and all(k.startswith(prefix) and ".wrapped." not in k for k in text)
    assert all(v.device.type == "cpu" for v in (*unet.values(), *text.values()))


def test_encode_and_decode_images(model: DiffusionModel) -> None:
    pixels = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    moments = model.encode_images(pixels)
    assert moments.mean.shape == moments.std.shape == (2, 4, 8, 6)
    assert bool((moments.std > 0).all()) and not moments.mean.requires_grad
    decoded = model.decode_latents(moments.mean)
    assert decoded.shape == (2, 3, 64, 48) and float(decoded.abs().max()) <= 1.0


def test_predict_shape_and_finite(model: DiffusionModel) -> None:
    with torch.no_grad():
        cond = model.encode_prompts(["a cat", "a dog"])
        out = model.predict(latents_for(model), torch.tensor([1, 999]), cond)
    assert out.shape == (2, 4, 8, 8) and bool(torch.isfinite(out).all()) and float(out.abs().mean()) > 1e-3
    if model.family == SDXL:  # size conditioning is used
        size = torch.tensor([[512.0, 512.0, 32.0, 0.0, 64.0, 64.0]]).expand(2, 6)
        with torch.no_grad():
            assert not torch.allclose(out, model.predict(latents_for(model), torch.tensor([1, 999]), cond, size))


def test_identity_context_transform_is_exact_and_undone(model: DiffusionModel) -> None:
    x, t = latents_for(model), torch.tensor([100, 600])
    seen: set[bool] = set()

    def identity(ctx: torch.Tensor, is_cross: bool) -> tuple[torch.Tensor, torch.Tensor]:
        seen.add(is_cross)
        return ctx, ctx

    with torch.no_grad():
        cond = model.encode_prompts(["a cat", "a dog"])
        before = model.predict(x, t, cond)
        with model.context_transform(identity):
            during = model.predict(x, t, cond)
        after = model.predict(x, t, cond)
    assert torch.equal(before, during) and torch.equal(before, after)
    assert seen == {True, False}
    seen.clear()
    with pytest.raises(RuntimeError), model.context_transform(identity):
        raise RuntimeError("boom")
    with torch.no_grad():
        model.predict(x, t, cond)
    assert not seen  # the transform is gone after an exception too


def test_context_transform_changes_output(model: DiffusionModel) -> None:
    x, t = latents_for(model), torch.tensor([100, 600])
    with torch.no_grad():
        cond = model.encode_prompts(["a cat", "a dog"])
        before = model.predict(x, t, cond)
        with model.context_transform(lambda ctx, is_cross: (ctx * 1.5, ctx) if is_cross else (ctx, ctx)):
            changed = model.predict(x, t, cond)
    assert not torch.allclose(before, changed)


def test_attention_widths(model: DiffusionModel) -> None:
    widths = model.attention_context_widths()
    assert widths["cross"] == {model.context_width}
    assert widths["self"] and model.context_width not in widths["self"]


def test_sample_is_deterministic(model: DiffusionModel) -> None:
    request = SampleRequest(("a cat",), ("",), steps=2, cfg_scale=5.0, width=64, height=48, seed=7)
    first = model.sample(request)
    again = model.sample(request)
    other = model.sample(SampleRequest(("a cat",), ("",), steps=2, cfg_scale=5.0, width=64, height=48, seed=8))
    assert len(first) == 1 and first[0].size == (64, 48) and first[0].mode == "RGB"
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[0]))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))
    assert request.sampler in model.sampler_names()


def test_sample_with_embedding_long_negative_and_transform(model: DiffusionModel) -> None:
    request = SampleRequest((f"a {NAME}",), (LONG_PROMPT,), steps=1, width=64, height=64, sampler="Euler a")
    images = model.sample(request, {NAME: make_embedding(model)}, lambda c, cross: (c, c))
    assert images[0].size == (64, 64)


class LowRank(torch.nn.Module):
    """A reference weight adapter for the contract: output change `scale * up(down(x))`, weight change
    `scale * up @ down` (kohya's LoRA maths, lora.md §2), with random up and down."""

    def __init__(self, target: AdapterTarget, rank: int = 2, scale: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        kernel = target.kernel_size
        down_shape = (rank, target.in_features, *kernel) if kernel else (rank, target.in_features)
        up_shape = (target.out_features, rank, 1, 1) if kernel else (target.out_features, rank)
        self.target, self.scale = target, scale
        self.down = torch.nn.Parameter(0.3 * torch.randn(down_shape, generator=generator))
        self.up = torch.nn.Parameter(0.3 * torch.randn(up_shape, generator=generator))

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        down, up = self.down.to(x.device, x.dtype), self.up.to(x.device, x.dtype)
        if self.target.kernel_size:
            hidden = torch.nn.functional.conv2d(x, down, stride=self.target.stride, padding=self.target.padding)
            return torch.nn.functional.conv2d(hidden, up) * self.scale
        return torch.nn.functional.linear(torch.nn.functional.linear(x, down), up) * self.scale

    def weight_delta(self, weight: torch.Tensor) -> torch.Tensor:
        assert weight.shape[0] == self.up.shape[0]  # the layer's own rows
        flat = self.up.flatten(1) @ self.down.flatten(1)
        return (flat.reshape(self.up.shape[0], *self.down.shape[1:]) * self.scale)


def adapters_for(model: DiffusionModel, scale: float = 0.5, blocks: tuple[str, ...] = ("transformer", "text"),
                 ) -> dict[str, LowRank]:
    return {name: LowRank(target, scale=scale, seed=i).to(model.device)
            for i, (name, target) in enumerate(sorted(model.adapter_targets().items()))
            if target.block in blocks and target.kind != "norm"}


def _outputs(model: DiffusionModel) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        cond = model.encode_prompts(["a cat", "a dog"])
        return cond.context, model.predict(latents_for(model), torch.tensor([10, 700]), cond)


def _hooks_left(model: DiffusionModel) -> list[str]:
    from torch.nn.utils import parametrize

    return [name for key, root in model.trainable_modules().items() for name, m in root.named_modules()
            if m._forward_hooks or parametrize.is_parametrized(m)]


def test_adapter_targets_are_kohya_names_and_a_query(model: DiffusionModel) -> None:
    before = model_state(model)
    targets = model.adapter_targets()
    assert model_state(model) == before
    prefixes = {"text_encoder": "lora_te1_" if model.family == SDXL else "lora_te_", "text_encoder_2": "lora_te2_",
                "unet": "lora_unet_"}
    assert all(name == t.name and name.startswith(prefixes[t.module]) for name, t in targets.items())
    assert {t.module for t in targets.values()} == set(model.trainable_modules())
    blocks = {t.block for t in targets.values()}
    assert blocks == {"transformer", "resnet", "sampler", "text"}
    layout = "lora_unet_input_blocks_" if model.family == SDXL else "lora_unet_down_blocks_"
    assert any(name.startswith(layout) for name in targets)
    # every transformer block: proj_in, proj_out and attn1/attn2 q, k, v, out, ff.net.0.proj, ff.net.2
    transformer = [n for n, t in targets.items() if t.block == "transformer" and t.kind != "norm"]
    assert len(transformer) % 12 == 0 and all(not n.endswith("_norm") for n in transformer)
    # the norm network type's layers: the transformer blocks' GroupNorm and LayerNorms, the resnets' GroupNorms
    norms = {t.block for t in targets.values() if t.kind == "norm"}
    assert norms == {"transformer", "resnet"} and all(t.module == "unet" for t in targets.values() if t.kind == "norm")
    text = [n for n, t in targets.items() if t.module == "text_encoder"]
    assert len(text) % 6 == 0 and any(n.endswith("_self_attn_q_proj") for n in text)
    assert any(n.endswith("_downsamplers_0_conv") or n.endswith("_0_op") for n in targets)


def test_zero_adapters_give_the_base_output_exactly(model: DiffusionModel) -> None:
    plain = _outputs(model)
    adapters = adapters_for(model, scale=0.0, blocks=("transformer", "resnet", "sampler", "text"))
    with model.weight_adapters(adapters):
        zero = _outputs(model)
    assert torch.equal(zero[0], plain[0]) and torch.equal(zero[1], plain[1])


def test_adapters_change_the_output_and_are_always_undone(model: DiffusionModel) -> None:
    plain = _outputs(model)
    adapters = adapters_for(model, blocks=("transformer", "resnet", "sampler", "text"))
    with model.weight_adapters(adapters):
        changed = _outputs(model)
        assert _hooks_left(model)
        with model.weight_adapters({}):  # a nested set replaces the outer one while it is active
            assert torch.equal(_outputs(model)[1], plain[1])
        assert torch.equal(_outputs(model)[1], changed[1])
        # also one on the same layers (a preview's set while training), fused q/k/v weights included
        zero = adapters_for(model, scale=0.0, blocks=("transformer", "resnet", "sampler", "text"))
        with model.weight_adapters(zero):
            assert torch.equal(_outputs(model)[1], plain[1])
        assert torch.equal(_outputs(model)[1], changed[1])
    assert not torch.allclose(changed[0], plain[0]) and not torch.allclose(changed[1], plain[1])
    assert not _hooks_left(model) and torch.equal(_outputs(model)[1], plain[1])
    with pytest.raises(RuntimeError, match="a failing job"), model.weight_adapters(adapters):
        raise RuntimeError("a failing job")
    assert not _hooks_left(model) and torch.equal(_outputs(model)[1], plain[1])
    from finetune_core.errors import ModelMismatchError

    with pytest.raises(ModelMismatchError, match="lora_unet_nowhere"), model.weight_adapters({"lora_unet_nowhere": 0}):
        pass


def _adapter_gradients(model: DiffusionModel, checkpointing: bool) -> dict[str, torch.Tensor]:
    adapters = adapters_for(model)
    setup = TrainingSetup(gradient_checkpointing=checkpointing)
    with model.training_session(setup) as session, model.placement(), model.weight_adapters(adapters):
        with session.autocast():
            cond = model.encode_prompts(["a cat", "a dog"])
            # 128 px: the middle block sees 2x2 cells, so its self-attention's q and k matter (1 cell: softmax of one)
            model.predict(latents_for(model, size=128), torch.tensor([10, 700]), cond).square().mean().backward()
    return {name: a.down.grad for name, a in adapters.items() if a.down.grad is not None}


def test_adapter_gradients_reach_every_adapter_and_survive_checkpointing(model: DiffusionModel) -> None:
    plain = _adapter_gradients(model, checkpointing=False)
    targets = model.adapter_targets()
    # every UNet and text adapter that can change the UNet's output gets a gradient (SDXL's CLIP-L last layer
    # and OpenCLIP's last layer feed nothing the UNet reads, except the pooled vector)
    assert len(plain) >= 0.9 * sum(t.block in ("transformer", "text") and t.kind != "norm" for t in targets.values())
    assert all(float(g.abs().sum()) > 0 for name, g in plain.items() if targets[name].module == "unet")
    checkpointed = _adapter_gradients(model, checkpointing=True)
    assert set(checkpointed) == set(plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-7)


# What another backend's test module imports (`from tests.model.test_contract import *`) to run the same contract.
__all__ = [name for name in dir() if name.startswith("test_")]
