"""The inspector tells artefacts apart by content, not by file size."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from finetune_core.errors import ArtifactError
from finetune_core.formats.aesthetic import write_aesthetic_embedding
from finetune_core.formats.atomic import save_pt
from finetune_core.formats.embedding import EmbeddingFile, write_embedding, write_embedding_png
from finetune_core.formats.hypernetwork_file import HypernetworkFile, write_hypernetwork
from finetune_core.formats.inspect import inspect_file, read_safetensors_header


def _emb(width: int = 768, n: int = 4) -> EmbeddingFile:
    return EmbeddingFile(name="foo", vectors={"clip_l": torch.randn(n, width)}, step=500, sd_checkpoint="abc123",
                         sd_checkpoint_name="tiny-sd1")


def _module(size: int) -> OrderedDict:
    return OrderedDict([("linear.0.weight", torch.zeros(2 * size, size)), ("linear.0.bias", torch.zeros(2 * size)),
                        ("linear.1.weight", torch.zeros(size, 2 * size)), ("linear.1.bias", torch.zeros(size))])


def test_embedding_pt(tmp_path):
    info = inspect_file(write_embedding(_emb(), tmp_path / "foo.pt"))
    assert (info.kind, info.width, info.vectors, info.family, info.step) == ("embedding", 768, 4, "SD1", 500)
    assert info.describe() == ("Textual-inversion embedding 'foo': 4 vectors of width 768 (SD1), step 500, "
                               "trained on tiny-sd1 [abc123]")


@pytest.mark.parametrize("emb, family, width", [
    (_emb(1024, 2), "SD2", 1024),
    (EmbeddingFile(name="xl", vectors={"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}), "SDXL", 2048),
])
def test_embedding_safetensors_from_header(tmp_path, emb, family, width):
    info = inspect_file(write_embedding(emb, tmp_path / "e.safetensors"))
    assert (info.kind, info.family, info.width, info.vectors) == ("embedding", family, width, 2)


def test_embedding_image(tmp_path):
    preview = Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8))
    info = inspect_file(write_embedding_png(_emb(n=1), preview, tmp_path / "foo.png"))
    assert (info.kind, info.vectors, info.name) == ("embedding", 1, "foo")
    assert "1 vector of width 768" in info.describe()


def test_hypernetwork(tmp_path):
    hn = HypernetworkFile(name="bar", layers={768: (_module(768), _module(768)), 320: (_module(320), _module(320))},
                          step=100, activation_func="relu")
    info = inspect_file(write_hypernetwork(hn, tmp_path / "bar.pt"))
    assert (info.kind, info.sizes, info.family, info.step) == ("hypernetwork", [320, 768], "SD1", 100)
    assert info.describe().startswith("Hypernetwork 'bar': modules for sizes 320, 768 (SD1), layer structure 1, 2, 1")


def test_aesthetic(tmp_path):
    info = inspect_file(write_aesthetic_embedding(torch.randn(768), tmp_path / "style.pt"))
    assert (info.kind, info.width, info.family) == ("aesthetic embedding", 768, "SD1")


def test_kohya_lora(tmp_path):
    tensors = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0)}
    save_file(tensors, str(tmp_path / "style.safetensors"))
    info = inspect_file(tmp_path / "style.safetensors")
    assert (info.kind, info.family) == ("lora", "SD1")
    assert "2 modules (1 UNet, 1 text encoder), rank 4, alpha per module (kohya naming)" in info.describe()


def test_checkpoint(tmp_path):
    pytest.importorskip("finetune_core.formats.checkpoint")
    tensors = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(8)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    info = inspect_file(tmp_path / "model.safetensors")
    assert (info.kind, info.family, info.tensor_count) == ("checkpoint", "SD1", 2)
    save_pt({"state_dict": tensors}, tmp_path / "model.ckpt")
    assert inspect_file(tmp_path / "model.ckpt").kind == "checkpoint"


@pytest.mark.parametrize("name, content", [
    ("garbage.pt", b"this is not a torch file at all" * 10),
    ("garbage.safetensors", b"\x00" * 64),
    ("garbage.png", b"\x89PNG not really"),
])
def test_garbage_is_unknown_with_a_reason(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    info = inspect_file(tmp_path / name)
    assert info.kind == "unknown" and info.details
    assert "is not an artefact" in info.describe()


def test_truncated_safetensors_is_unknown(tmp_path):
    path = write_embedding(_emb(), tmp_path / "foo.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    assert "truncated" in inspect_file(path).details
    with pytest.raises(ArtifactError, match="truncated"):
        read_safetensors_header(path)


def test_other_dict_is_unknown(tmp_path):
    save_pt({"weights": [1, 2, 3], "note": "hi"}, tmp_path / "other.pt")
    info = inspect_file(tmp_path / "other.pt")
    assert info.kind == "unknown" and "2 keys" in info.details


def test_missing_file_raises(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        inspect_file(tmp_path / "nope.pt")


def test_a_text_file_is_said_plainly_and_no_message_advises_unsafe_loading(tmp_path):
    import pickle

    (tmp_path / "README.md").write_text("# A readme\n\nNot a model.\n")
    text = inspect_file(tmp_path / "README.md").describe()
    assert text == ("README.md is not an artefact (an embedding, hypernetwork, checkpoint, LoRA or aesthetic "
                    "embedding): it is a text file")
    with open(tmp_path / "evil.pt", "wb") as handle:  # a real pickle that imports os.system
        pickle.dump({"x": __import__("os").system}, handle, protocol=2)
    text = inspect_file(tmp_path / "evil.pt").describe()
    assert "refused" in text and "weights_only" not in text and ("os.system" in text or "posix.system" in text)


def test_a_run_folders_own_files_are_named(tmp_path):
    from PIL import Image

    from finetune_core.train.run_folder import RunFolder

    run = RunFolder(tmp_path / "run")
    run.save_state({"counters": {}}, {"steps": 2})
    (run.path / "request.json").write_text("{}")
    preview = run.save_image(Image.new("RGB", (8, 8)), "emb-2", "a prompt\nSteps: 20, Fine-tune: x emb step 2")
    assert "the resume state of a training run" in inspect_file(run.state_dir / "checkpoint.pt").describe()
    assert "--resume" in inspect_file(run.state_dir / "checkpoint.pt").describe()
    assert "a preview image of the training run" in inspect_file(preview).describe()
    assert "the request the training run" in inspect_file(run.path / "request.json").describe()
