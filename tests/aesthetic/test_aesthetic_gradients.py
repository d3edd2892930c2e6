"""Aesthetic Gradients: creating an embedding from images with a local CLIP, and applying one to the conditioning
(on the tiny diffusers models; the WebUI section is tested in tests/webui/test_webui_aesthetic.py)."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune_core.aesthetic.gradients import (
    AestheticApplyConfig,
    AestheticCreateConfig,
    AestheticLibrary,
    create_embedding,
)
from finetune_core.aesthetic.personalized_text import (
    AestheticTarget,
    ConditioningCache,
    Personalization,
    PersonalizedText,
)
from finetune_core.errors import ArtifactError, ConfigError, DatasetError, ModelMismatchError
from finetune_core.formats.aesthetic import write_aesthetic_files
from tests.aesthetic.clip_fixtures import open_clip_file, transformers_clip
from tests.formats.conftest import webui_gate

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "dataset"
PROMPTS = ["a photo of a cat, detailed", ""]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """The example images plus the kinds a style folder holds: RGBA, greyscale, a GIF, and a caption file."""
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(EXAMPLES.glob("*.png"))[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    Image.new("RGBA", (40, 56), (10, 200, 30, 120)).save(folder / "alpha.png")
    Image.new("L", (70, 30), 90).save(folder / "grey.JPG")
    Image.new("P", (33, 33), 3).save(folder / "anim.gif")
    (folder / "caption.txt").write_text("not an image")
    return folder


def reference_features(clip_folder: Path, folder: Path) -> torch.Tensor:
    """The mean CLIP image feature computed with transformers' own processor and model, not our code."""
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(clip_folder).eval()
    processor = CLIPImageProcessor.from_pretrained(clip_folder)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".gif"))
    with torch.no_grad():
        out = model.get_image_features(**processor(images=[Image.open(p) for p in paths], return_tensors="pt"))
    features = out if isinstance(out, torch.Tensor) else out.pooler_output
    return features.mean(dim=0, keepdim=True)


def test_created_embedding_is_the_mean_of_the_clip_image_features(tmp_path, images):
    clip = transformers_clip(tmp_path / "clip")
    out = tmp_path / "aesthetic"
    seen: list[tuple[int, int]] = []
    paths = create_embedding("style", AestheticCreateConfig(str(images), str(clip), batch_size=4), out,
                             progress=lambda done, total: seen.append((done, total)))
    assert [p.name for p in paths] == ["style.pt", "style.safetensors"]
    webui_gate(paths[0])  # a stock WebUI loads it
    vector = torch.load(paths[0], weights_only=True)
    assert vector.shape == (1, 768) and vector.dtype == torch.float32
    torch.testing.assert_close(vector, reference_features(clip, images), rtol=1e-4, atol=1e-5)
    assert seen == [(4, 6), (6, 6)]
    from transformers import CLIPModel

    from finetune_core.formats.aesthetic import read_aesthetic_sidecar

    copy_vector, projection, meta = read_aesthetic_sidecar(paths[1])
    assert torch.equal(copy_vector, vector)
    assert torch.equal(projection, CLIPModel.from_pretrained(clip).text_projection.weight.detach().t())
    assert meta["image_count"] == "6" and meta["clip_model"] == "clip" and meta["created"][:2] == "20"


def test_open_clip_weights_give_the_features_open_clip_computes(tmp_path):
    from finetune_core.aesthetic.clip_vision import load_clip

    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for name in ("ViT-x.safetensors", "open_clip_pytorch_model.bin"):
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        visual = open_clip_file(folder / name)
        clip = load_clip(folder / name if name.endswith("safetensors") else folder)
        with torch.no_grad():
            torch.testing.assert_close(clip.vision(pixel_values=pixels).image_embeds, visual(pixels),
                                       rtol=1e-4, atol=1e-5)
        assert clip.text_projection.shape == (768, 768)
    configured = tmp_path / "configured"
    configured.mkdir()
    visual = open_clip_file(configured / "open_clip_model.safetensors", heads=4)
    (configured / "open_clip_config.json").write_text('{"model_cfg": {"vision_cfg": {"head_width": 16}}}')
    with torch.no_grad():
        got = load_clip(configured).vision(pixel_values=pixels).image_embeds
    torch.testing.assert_close(got, visual(pixels), rtol=1e-4, atol=1e-5)


class _Boom:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("case, message", [
    ("missing", "there is no CLIP model at"),
    ("empty folder", "is not a CLIP model folder"),
    ("other model", "holds a bert model, not CLIP"),
    ("code pickle", "refused"),
    ("not weights", "is not a weights file"),
])
def test_a_missing_or_wrong_clip_gets_a_sentence(tmp_path, images, case, message):
    clip = tmp_path / "clip"
    if case == "empty folder":
        clip.mkdir()
    elif case == "other model":
        clip.mkdir()
        (clip / "config.json").write_text('{"model_type": "bert"}')
        (clip / "model.safetensors").write_bytes(b"")
    elif case == "code pickle":
        clip.mkdir()
        with open(clip / "open_clip_pytorch_model.bin", "wb") as handle:
            pickle.dump({"visual.proj": _Boom()}, handle)
    elif case == "not weights":
        clip = tmp_path / "clip.txt"
        clip.write_text("hello")
    with pytest.raises(ArtifactError, match=message) as error:
        create_embedding("style", AestheticCreateConfig(str(images), str(clip)), tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_folder_without_images_gets_a_sentence(tmp_path):
    (tmp_path / "words").mkdir()
    (tmp_path / "words" / "a.txt").write_text("x")
    for folder, message in ((tmp_path / "words", "has no images"), (tmp_path / "nothing", "does not exist")):
        with pytest.raises(DatasetError, match=message):
            create_embedding("style", AestheticCreateConfig(str(folder), "clip"), tmp_path / "out")
    (tmp_path / "words" / "broken.png").write_bytes(b"not a png")
    clip = transformers_clip(tmp_path / "clip")
    with pytest.raises(DatasetError, match="none of the 1 images in .*words can be read"):
        create_embedding("style", AestheticCreateConfig(str(tmp_path / "words"), str(clip)), tmp_path / "out")


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (and holds none): what a decompression bomb starts with."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_a_decompression_bomb_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    """Issue 25.11: a 100000 x 100000 PNG header was a DecompressionBombError traceback."""
    import shutil

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(EXAMPLES / "ball-01.png", images / "ball-01.png")
    (images / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    clip = transformers_clip(tmp_path / "clip")
    with caplog.at_level("WARNING"):
        paths = create_embedding("style", AestheticCreateConfig(str(images), str(clip)), tmp_path / "out")
    assert [p.name for p in paths] == ["style.pt", "style.safetensors"]
    assert any("bomb.png" in r.getMessage() and "cannot be read" in r.getMessage() for r in caplog.records)


def test_create_settings_are_checked():
    with pytest.raises(ConfigError, match="batch size must be between 1 and 1024"):
        AestheticCreateConfig("x", "y", batch_size=0).validate()
    with pytest.raises(ConfigError, match="no CLIP model is set"):
        AestheticCreateConfig("x", "").validate()


# --- apply ------------------------------------------------------------------------------------------------------
def target_for(width: int, seed: int = 0) -> AestheticTarget:
    generator = torch.Generator().manual_seed(seed)
    return AestheticTarget.of("style", torch.randn(1, width, generator=generator),
                              torch.randn(width, width, generator=generator) * width ** -0.5)


def encode(model, prompts, hook=None):
    with torch.no_grad():
        if hook is None:
            return model.encode_prompts(prompts).context
        with model.text_chunk_hook(hook):
            return model.encode_prompts(prompts).context


def test_weight_or_steps_or_rate_zero_give_exactly_the_original(tiny_model):
    model = tiny_model("tiny-sd1")
    plain = encode(model, PROMPTS)
    cache = ConditioningCache()
    for options in (Personalization(weight=0.0), Personalization(steps=0), Personalization(lr=0.0)):
        assert torch.equal(encode(model, PROMPTS, PersonalizedText(target_for(768), options, cache)), plain)
    assert cache.optimisations == 0 and len(cache) == 0


def test_a_repeated_prompt_costs_no_optimisation_and_gives_the_same_conditioning(tiny_model):
    model = tiny_model("tiny-sd1")
    cache = ConditioningCache()
    options = Personalization(lr=1e-3)
    first = encode(model, PROMPTS, PersonalizedText(target_for(768), options, cache))
    assert cache.optimisations == 1  # the prompt's one chunk; the empty negative prompt is left alone
    again = encode(model, PROMPTS, PersonalizedText(target_for(768), options, cache))
    assert cache.optimisations == 1 and torch.equal(again, first)
    lighter = encode(model, PROMPTS, PersonalizedText(target_for(768), Personalization(weight=0.5, lr=1e-3), cache))
    assert cache.optimisations == 1  # the blend weight is applied to the cached rows
    plain = encode(model, PROMPTS)
    torch.testing.assert_close(lighter[0], (plain[0] + (first[0] - 0.1 * plain[0]) / 0.9) / 2, rtol=1e-4, atol=1e-4)
    encode(model, PROMPTS, PersonalizedText(target_for(768), Personalization(steps=3, lr=1e-3), cache))
    encode(model, PROMPTS, PersonalizedText(target_for(768, seed=1), options, cache))
    assert cache.optimisations == 3  # other steps, another embedding: computed anew


def test_the_result_does_not_depend_on_the_seed_or_the_batch(tiny_model):
    model = tiny_model("tiny-sd1")
    results = []
    for seed, prompts in ((1, PROMPTS), (2, PROMPTS), (3, ["a red house", *PROMPTS])):
        torch.manual_seed(seed)
        hook = PersonalizedText(target_for(768), Personalization(lr=1e-3), ConditioningCache())
        results.append(encode(model, prompts, hook)[-2:])
    assert torch.equal(results[0], results[1])
    torch.testing.assert_close(results[2], results[0], rtol=1e-5, atol=1e-5)


def test_an_empty_negative_prompt_is_left_alone_unless_asked(tiny_model):
    model = tiny_model("tiny-sd1")
    plain = encode(model, PROMPTS)
    left = encode(model, PROMPTS, PersonalizedText(target_for(768), Personalization(lr=1e-3), ConditioningCache()))
    asked = encode(model, PROMPTS, PersonalizedText(target_for(768), Personalization(lr=1e-3, empty_prompts=True),
                                                    ConditioningCache()))
    assert torch.equal(left[1], plain[1]) and not torch.allclose(left[0], plain[0])
    assert not torch.allclose(asked[1], plain[1])


def chunk_ids(model, prompt: str) -> torch.Tensor:
    """(1, 77): the prompt's first chunk as the encoder reads it."""
    captured = {}

    def keep(chunks):
        captured["ids"] = chunks.tokens[:1]
        return chunks.hidden

    with torch.no_grad(), model.text_chunk_hook(keep):
        model.encode_prompts([prompt])
    return captured["ids"]


def original_personalisation(model, prompt: str, target: AestheticTarget, steps: int, lr: float) -> torch.Tensor:
    """What the original extension does for one chunk, written plainly: a deep copy of the whole text encoder,
    Adam on all its parameters, then its last hidden state (here with the chunk's ids as the encoder reads them)."""
    ids = chunk_ids(model, prompt)
    encoder = copy.deepcopy(model.trainable_modules()["text_encoder"]).requires_grad_(True)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=lr)
    for _ in range(steps):
        features = encoder(input_ids=ids).pooler_output @ target.projection
        features = features / features.norm(dim=-1, keepdim=True)
        loss = -(features @ target.direction.T).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return encoder(input_ids=ids).last_hidden_state[0]


def original_slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The original extension's slerp as it is written there (along dim 1, no guard)."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    omega = torch.acos((low_norm * high_norm).sum(1))
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def test_personalisation_equals_tuning_a_copy_of_the_whole_encoder(tiny_model):
    model = tiny_model("tiny-sd1")
    target = target_for(768, seed=4)
    plain = encode(model, ["a photo of a cat"])[0]
    ours = encode(model, ["a photo of a cat"], PersonalizedText(target, Personalization(weight=1.0, steps=4, lr=1e-3),
                                                                 ConditioningCache()))[0]
    expected = original_personalisation(model, "a photo of a cat", target, steps=4, lr=1e-3)
    assert not torch.allclose(expected, plain, atol=1e-3)  # the optimisation did move it
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("negative", [False, True])
def test_steering_text_and_slerp_blend_follow_the_original(tiny_model, negative):
    """The target turned toward the text's feature (negative: toward normalize(e - t)) by the slerp angle, the text
    feature not normalised, and the slerp blend along the token axis: as the original computes them."""
    model = tiny_model("tiny-sd1")
    image = target_for(768, seed=5)
    with torch.no_grad():
        encoder = model.trainable_modules()["text_encoder"]
        text = encoder(input_ids=chunk_ids(model, "a sunny beach")).pooler_output @ image.projection
    if negative:
        text = image.direction - text
        text = text / text.norm(dim=-1, keepdim=True)
    steered = AestheticTarget("steered", original_slerp(0.3, image.direction, text), image.projection, "")
    personal = original_personalisation(model, "a photo of a cat", steered, steps=3, lr=1e-3)
    plain = encode(model, ["a photo of a cat"])
    expected = original_slerp(0.6, plain, personal.unsqueeze(0))
    options = Personalization(weight=0.6, steps=3, lr=1e-3, slerp=True, text="a sunny beach", text_negative=negative,
                              slerp_angle=0.3)
    ours = encode(model, ["a photo of a cat"], PersonalizedText(image, options, ConditioningCache()))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    unsteered = encode(model, ["a photo of a cat"], PersonalizedText(
        image, Personalization(weight=0.6, steps=3, lr=1e-3, slerp=True), ConditioningCache()))
    assert not torch.allclose(ours, unsteered, atol=1e-3)  # the text did turn the target


@pytest.mark.parametrize("name, width, changed", [
    ("tiny-sd2", 1024, slice(0, 1024)),
    ("tiny-sdxl", 768, slice(0, 768)),  # a ViT-L/14 embedding acts on SDXL's CLIP-L only
    ("tiny-sdxl", 1280, slice(768, 2048)),  # a bigG one on OpenCLIP-G only
])
def test_sd2_and_sdxl(tiny_model, name, width, changed):
    model = tiny_model(name)
    plain = encode(model, PROMPTS)
    cache = ConditioningCache()
    hooked = encode(model, PROMPTS, PersonalizedText(target_for(width), Personalization(lr=1e-3), cache))
    assert cache.optimisations == 1
    assert not torch.allclose(hooked[0, :, changed], plain[0, :, changed])
    keep = torch.ones(plain.shape[-1], dtype=torch.bool)
    keep[changed] = False
    assert torch.equal(hooked[0][:, keep], plain[0][:, keep]) and torch.equal(hooked[1], plain[1])


def test_applying_leaves_the_model_as_it_was(tiny_model):
    from tests.conftest import weights_checksum

    model = tiny_model("tiny-sdxl")
    before = weights_checksum(model)
    flags = [p.requires_grad for m in model.trainable_modules().values() for p in m.parameters()]
    encode(model, PROMPTS, PersonalizedText(target_for(1280), Personalization(lr=1e-3), ConditioningCache()))
    assert weights_checksum(model) == before
    assert flags == [p.requires_grad for m in model.trainable_modules().values() for p in m.parameters()]
    assert all(p.grad is None for m in model.trainable_modules().values() for p in m.parameters())


# --- the library and the settings --------------------------------------------------------------------------------
@pytest.fixture
def library(tmp_path):
    folder = tmp_path / "aesthetic_embeddings"
    target = target_for(768)
    write_aesthetic_files(target.direction * 7, target.projection, {"clip_model": "test"}, folder, "style")
    torch.save(torch.randn(768), folder / "downloaded.pt")
    return AestheticLibrary(lambda: [folder])


def test_the_library_lists_new_files_and_reads_what_goes_with_them(tiny_model, library, tmp_path):
    assert library.names() == ["None", "downloaded", "style"]
    torch.save(torch.randn(1, 1024), tmp_path / "aesthetic_embeddings" / "added.pt")
    assert library.names() == ["None", "added", "downloaded", "style"]  # no restart needed
    model = tiny_model("tiny-sd1")
    assert library.hook(model, AestheticApplyConfig()) is None  # "None" is off
    hook = library.hook(model, AestheticApplyConfig(aesthetic_embedding="style"))
    assert hook is not None and torch.allclose(hook.target.direction, target_for(768).direction)
    with pytest.raises(ArtifactError, match="has no .safetensors copy with its CLIP's text projection"):
        library.hook(model, AestheticApplyConfig(aesthetic_embedding="downloaded"))
    clip = transformers_clip(tmp_path / "clip")
    with_clip = library.hook(model, AestheticApplyConfig(aesthetic_embedding="downloaded", clip_model=str(clip)))
    assert with_clip is not None and with_clip.target.text_width == 768
    with pytest.raises(ModelMismatchError, match="'added' is 1024 wide but the CLIP text projection is 768 wide"):
        library.hook(model, AestheticApplyConfig(aesthetic_embedding="added", clip_model=str(clip)))
    wide = target_for(1024)
    write_aesthetic_files(wide.direction, wide.projection, {}, tmp_path / "aesthetic_embeddings", "sd2-style")
    with pytest.raises(ModelMismatchError, match="text width is 1024, but this SD1 model's text encoders are 768"):
        library.hook(model, AestheticApplyConfig(aesthetic_embedding="sd2-style"))
    with pytest.raises(ArtifactError, match="no aesthetic embedding 'gone'"):
        library.hook(model, AestheticApplyConfig(aesthetic_embedding="gone"))


class _Touch:
    """Unpickling it creates a file: proof that the pickle's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_code_running_pickle_is_refused(tiny_model, library, tmp_path):
    marker = tmp_path / "the-pickle-ran"
    folder = tmp_path / "aesthetic_embeddings"
    with open(folder / "evil.pt", "wb") as handle:
        pickle.dump(_Touch(marker), handle)
    assert "evil" in library.names()  # listing reads no .pt
    config = AestheticApplyConfig(aesthetic_embedding="evil", clip_model="x")
    with pytest.raises(ArtifactError, match="refused") as error:
        library.hook(tiny_model("tiny-sd1"), config)
    assert "evil.pt" in str(error.value) and "\n" not in str(error.value)
    # Beside a readable safetensors copy the .pt is still what is read (the user may have replaced it): refused too.
    target = target_for(768)
    write_aesthetic_files(target.direction, target.projection, {}, folder, "evil2")
    (folder / "evil2.pt").write_bytes((folder / "evil.pt").read_bytes())
    with pytest.raises(ArtifactError, match="refused"):
        library.hook(tiny_model("tiny-sd1"), AestheticApplyConfig(aesthetic_embedding="evil2"))
    assert not marker.exists()


@pytest.mark.parametrize("settings, message", [
    ({"aesthetic_weight": 1.5}, "aesthetic weight must be between 0 and 1, not 1.5"),
    ({"aesthetic_steps": 51}, "aesthetic steps must be between 0 and 50, not 51"),
    ({"aesthetic_steps": -1}, "aesthetic steps must be between 0 and 50"),
    ({"aesthetic_lr": -0.001}, "aesthetic learning rate must be between 0 and 0.1"),
    ({"aesthetic_lr": 1.0}, "aesthetic learning rate must be between 0 and 0.1, not 1.0"),
    ({"aesthetic_slerp_angle": 2.0}, "slerp angle must be between 0 and 1"),
])
def test_settings_out_of_range_get_one_sentence(settings, message):
    with pytest.raises(ConfigError, match=message) as error:
        AestheticApplyConfig(**{"aesthetic_embedding": "style", **settings}).validate()
    assert "\n" not in str(error.value)


def test_infotext_has_the_original_keys():
    config = AestheticApplyConfig(aesthetic_embedding="style")
    assert config.infotext() == {
        "Aesthetic LR": 0.0001, "Aesthetic weight": 0.9, "Aesthetic steps": 5, "Aesthetic embedding": "style",
        "Aesthetic slerp": False, "Aesthetic text": "", "Aesthetic text negative": False,
        "Aesthetic slerp angle": 0.1}


@pytest.mark.parametrize("name, model", [("tiny-clip", "tiny-sd1"), ("tiny-clip", "tiny-sdxl"),
                                         ("tiny-clip-h", "tiny-sd2")])
def test_the_built_in_tiny_clips_fit_the_tiny_models_and_are_the_same_every_time(name, model):
    from finetune_core.aesthetic.clip_vision import load_clip, load_text_projection
    from finetune_core.model.tiny import tiny_configs, tiny_spec

    state = torch.random.get_rng_state()
    clip = load_clip(name)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    encoder = tiny_configs(tiny_spec(model))["text_encoder"]
    assert clip.text_projection.shape == (encoder["hidden_size"], encoder["projection_dim"]) == (clip.dim, clip.dim)
    pictures = [Image.new("RGB", (48, 40), (200, 30, 90)), Image.new("L", (20, 64), 77)]
    features = clip.features(pictures)
    assert features.shape == (2, clip.dim) and bool(torch.isfinite(features).all())
    assert not torch.allclose(features[0], features[1])  # the images are told apart
    assert torch.equal(load_clip(name).features(pictures), features)
    assert torch.equal(load_text_projection(name), clip.text_projection)
