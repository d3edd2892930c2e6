"""DreamArtist inside the WebUI stand-in: the pair trains on SD1, SD2 (v) and SDXL through the WebUI backend, the
loaded model is unchanged, both files load with the WebUI's own loader, and txt2img with NAME in the prompt and
NAME-neg in the negative prompt uses both."""

from __future__ import annotations

import pytest
import torch
from webui_runs import same_weights, snapshot

from finetune_core.formats.embedding import read_embedding
from finetune_core.jobs import service

WIDTHS = {"sd1": {"clip_l": 768}, "sd2": {"clip_l": 1024}, "sdxl": {"clip_l": 768, "clip_g": 1280}}


def _build(family: str):
    import tiny_webui_model
    import tiny_webui_sdxl

    return {"sd1": tiny_webui_model.build_sd1, "sd2": tiny_webui_sdxl.build_sd2,
            "sdxl": tiny_webui_sdxl.build_sdxl}[family]()


def _txt2img(sd_model, prompt: str, negative: str):
    from modules import processing

    p = processing.StableDiffusionProcessingTxt2Img(sd_model=sd_model, prompt=prompt, negative_prompt=negative,
                                                    steps=3, cfg_scale=7.0, width=64, height=64, seed=5)
    image = processing.process_images(p).images[0]
    p.close()
    return torch.tensor(list(image.getdata()), dtype=torch.float32)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_pair_trains_and_generates_in_the_webui(family, webui, dataset, tmp_path):
    from modules import sd_hijack

    from finetune_core.model.webui_backend import WebUIModel

    sd = _build(family)
    before = snapshot(sd)
    folders = service.OutputFolders.standalone(tmp_path / "out")
    request = service.TrainRequest(
        "dreamartist", "tinyart", {"num_vectors": 2, "neg_num_vectors": 3, "init_text": "cat",
                                   "reconstruction": True},
        {"data_dir": str(dataset), "width": 64, "height": 64},
        {"steps": 3, "learning_rate": "0.05", "save_every": 0, "preview_every": 3, "preview_steps": 2,
         "csv_every": 0})
    result = service.train(request, WebUIModel(sd), folders)
    assert result.step == 3 and same_weights(sd, before)
    halves = [read_embedding(p) for p in result.artifacts]
    assert [h.name for h in halves] == ["tinyart", "tinyart-neg"]
    assert [{k: v.shape for k, v in h.vectors.items()} for h in halves] == \
        [{k: (n, w) for k, w in WIDTHS[family].items()} for n in (2, 3)]

    # The WebUI loads both files from its embeddings folder with its own loader (right width: not skipped)...
    db = sd_hijack.model_hijack.embedding_db
    db.add_embedding_dir(str(folders.embeddings))
    db.load_textual_inversion_embeddings(force_reload=True)
    assert {"tinyart", "tinyart-neg"} <= set(db.word_embeddings) and not db.skipped_embeddings
    # ...and txt2img uses each one where it is typed.
    plain = _txt2img(sd, "a photo of a cat", "")
    with_both = _txt2img(sd, "a photo of tinyart", "tinyart-neg")
    positive_only = _txt2img(sd, "a photo of tinyart", "")
    assert not torch.equal(with_both, plain) and not torch.equal(with_both, positive_only)
    assert same_weights(sd, before)


@pytest.mark.parametrize("flag", ["medvram", "lowvram"])
def test_reconstruction_under_low_vram_fires_no_hook_inside_a_step(flag, extension, webui, dataset, monkeypatch):
    """The decode with gradients brings the VAE in by the placement, not by a low-VRAM hook inside a step."""
    from test_webui_training import run, weights_checksum
    from webui_runs import spy_on_steps

    setattr(webui.cmd_opts, flag, True)
    import tiny_webui_model

    sd = tiny_webui_model.build_sd1()
    checksum = weights_checksum(sd)
    fired_inside, resident = spy_on_steps(monkeypatch)
    request = service.TrainRequest(
        "dreamartist", "lowart", {"num_vectors": 1, "neg_num_vectors": 2, "reconstruction": True},
        {"data_dir": str(dataset), "width": 64, "height": 64},
        {"steps": 2, "learning_rate": "0.01", "save_every": 0, "preview_every": 0, "csv_every": 0})
    state, _ = run(extension, request)
    assert state.status == "finished", (state.error, state.messages)
    assert len(fired_inside) >= 2 and all(calls == [] for calls in fired_inside), fired_inside
    assert resident and all(r["unet"] == "device" and r["text"] == "device" for r in resident)
    assert weights_checksum(sd) == checksum
