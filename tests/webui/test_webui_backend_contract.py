"""The shared DiffusionModel contract suite (tests/model/test_contract.py), run on the WebUI backend over the stub."""

from __future__ import annotations

import pytest
import torch

from tests.model.test_contract import *  # noqa: F403  (the shared DiffusionModel contract suite)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from modules import devices, sd_hijack, shared

    shared.reset(str(tmp_path_factory.mktemp("webui")))
    devices.device = torch.device("cpu")
    sd_hijack.new_model_hijack()
    import tiny_webui_model

    from finetune_core.model.webui_backend import WebUIModel

    return WebUIModel(tiny_webui_model.build_sd1())
