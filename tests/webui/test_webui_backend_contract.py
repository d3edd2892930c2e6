"""The shared DiffusionModel contract suite (tests/model/test_contract.py), run on the WebUI backend over the stub."""

from __future__ import annotations

import pytest
import torch

from tests.model.test_contract import (  # noqa: F401
    test_alphas_cumprod,
    test_attention_widths,
    test_context_transform_changes_output,
    test_count_tokens,
    test_embedding_changes_output_only_where_named,
    test_encode_and_decode_images,
    test_encode_prompts_shapes,
    test_gradients_reach_only_the_embedding,
    test_identity_and_widths,
    test_identity_context_transform_is_exact_and_undone,
    test_long_prompt_takes_two_chunks_and_batch_is_padded,
    test_predict_shape_and_finite,
    test_prediction_type_matches_family,
    test_sampler_is_deterministic,
    test_token_vectors,
    test_trainable_modules,
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from modules import devices, sd_hijack, shared

    shared.reset(str(tmp_path_factory.mktemp("webui")))
    devices.device = torch.device("cpu")
    sd_hijack.new_model_hijack()
    import tiny_webui_model

    from finetune_core.model.webui_backend import WebUIModel

    backend = WebUIModel(tiny_webui_model.build_sd1())
    yield backend
    backend.restore_weights()
