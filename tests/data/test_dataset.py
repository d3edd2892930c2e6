import math
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from finetune_core.data.cache import LatentCache
from finetune_core.data.dataset import ImageDataset
from finetune_core.data.dataset_config import DatasetConfig
from finetune_core.errors import ConfigError, DatasetError


def _config(folder: Path, **changes) -> DatasetConfig:
    return replace(DatasetConfig(data_dir=str(folder), width=64, height=64, template="subject_filewords.txt",
                                 placeholder="tok", latent_sampling="deterministic"), **changes)


def _prepared(config: DatasetConfig, model, cache: LatentCache | None = None) -> ImageDataset:
    dataset = ImageDataset(config, cache=cache)
    dataset.prepare(model)
    return dataset


def _drawn(config: DatasetConfig, model, cache: LatentCache | None = None, batches: int = 16) -> ImageDataset:
    """A prepared dataset whose first `batches` batches were drawn (an image is encoded when first drawn)."""
    dataset = _prepared(config, model, cache)
    for index in range(batches):
        dataset.get_batch(index, 0)
    return dataset


def test_defaults_match_webui_and_every_field_has_metadata():
    config = DatasetConfig()
    assert (config.width, config.height, config.template, config.batch_size) == (512, 512, "style_filewords.txt", 1)
    assert (config.latent_sampling, config.shuffle_tags, config.tag_dropout, config.flip_p) == ("once", False, 0.0, 0.0)
    assert (config.repeats, config.crop, config.resize_mode, config.keep_tags) == (1, "center", "fixed", 0)
    for item in fields(DatasetConfig):
        assert item.metadata["label"] and item.metadata["help"]
    assert "buckets" in next(f for f in fields(DatasetConfig) if f.name == "resize_mode").metadata["choices"]


def test_validate_lists_every_problem():
    bad = DatasetConfig(data_dir="", width=100, batch_size=0, flip_p=2.0, crop="diagonal", template="nope.txt",
                        filename_word_regex="(")
    with pytest.raises(ConfigError) as info:
        bad.validate()
    names = " ".join(info.value.problems)
    for word in ("data_dir", "width", "batch_size", "flip_p", "crop", "nope.txt", "filename_word_regex"):
        assert word in names


def test_batches_share_a_size_and_cover_every_entry(tmp_path: Path, make_image, fake_model):
    for i, size in enumerate([(64, 64), (64, 64), (64, 64), (128, 64), (128, 64)]):
        make_image(tmp_path / f"{i}.png", size, seed=i)
    config = _config(tmp_path, width=128, height=128, resize_mode="buckets", batch_size=2, repeats=2)
    dataset = _prepared(config, fake_model)
    assert dataset.batches_per_epoch() == math.ceil(6 / 2) + math.ceil(4 / 2)
    seen = []
    for index in range(dataset.batches_per_epoch()):
        batch = dataset.get_batch(index, seed=7)
        assert len({tuple(row[4:].tolist()) for row in batch.size_cond}) == 1
        seen += batch.image_paths
    assert sorted(seen) == sorted(str(r.path) for r in dataset.records for _ in range(2))


def test_get_batch_is_pure_and_seeded(folder: Path, fake_model):
    config = _config(folder, batch_size=2, shuffle_tags=True, flip_p=0.5, latent_sampling="random")
    dataset = _prepared(config, fake_model)
    first, again = dataset.get_batch(5, seed=1), dataset.get_batch(5, seed=1)
    dataset.get_batch(0, seed=3)  # other calls in between change nothing
    third = dataset.get_batch(5, seed=1)
    for other in (again, third):
        assert first.prompts == other.prompts and torch.equal(first.latents, other.latents)
        assert first.image_paths == other.image_paths
    fresh = _prepared(config, fake_model)
    assert fresh.get_batch(5, seed=1).prompts == first.prompts
    differs = [dataset.get_batch(i, seed=2).prompts != dataset.get_batch(i, seed=1).prompts for i in range(6)]
    assert any(differs)


def test_template_line_is_redrawn_every_step(tmp_path: Path, make_image, fake_model):
    make_image(tmp_path / "one.png")
    dataset = _prepared(_config(tmp_path, template="subject.txt"), fake_model)
    prompts = {dataset.get_batch(i, seed=0).prompts[0] for i in range(12)}
    assert len(prompts) > 2 and all("tok" in p for p in prompts)


def test_shuffle_keep_and_dropout_in_prompts(folder: Path, fake_model):
    config = _config(folder, template="hypernetwork.txt", shuffle_tags=True, keep_tags=1, tag_dropout=0.3)
    dataset = _prepared(config, fake_model)
    for index in range(20):
        batch = dataset.get_batch(index, seed=0)
        caption = Path(batch.image_paths[0]).with_suffix(".txt").read_text(encoding="utf-8")
        first_tag = caption.split(",")[0]
        assert first_tag in batch.prompts[0]
        assert batch.prompts[0].count("tag") <= 4


def test_flip_is_really_applied(tmp_path: Path, make_image, fake_model):
    make_image(tmp_path / "a.png", (64, 64))
    plain = _prepared(_config(tmp_path, keep_pixels=True), fake_model).get_batch(0, 0)
    dataset = _prepared(_config(tmp_path, flip_p=1.0, keep_pixels=True), fake_model)
    flipped = dataset.get_batch(0, 0)
    assert flipped.extras["flipped"] == [True]
    assert torch.allclose(flipped.latents, torch.flip(plain.latents, dims=[3]))
    assert torch.allclose(flipped.pixels, torch.flip(plain.pixels, dims=[3]))
    half = _prepared(_config(tmp_path, flip_p=0.5), fake_model)
    flags = {half.get_batch(i, 0).extras["flipped"][0] for i in range(20)}
    assert flags == {True, False}


def test_latent_is_the_encoded_crop(tmp_path: Path, make_image, fake_model):
    path = make_image(tmp_path / "a.png", (64, 64))
    batch = _prepared(_config(tmp_path, keep_pixels=True), fake_model).get_batch(0, 0)
    pixels = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(batch.pixels[0], pixels, atol=1e-5)
    assert torch.allclose(batch.latents[0, :3], F.avg_pool2d(pixels[None], 8)[0], atol=1e-5)
    assert batch.size_cond[0].tolist() == [64, 64, 0, 0, 64, 64]
    assert batch.loss_weight is None


def test_latent_sampling_modes(tmp_path: Path, make_image, fake_model):
    make_image(tmp_path / "a.png")
    mean = _prepared(_config(tmp_path), fake_model).get_batch(0, 0).latents
    once = _prepared(_config(tmp_path, latent_sampling="once"), fake_model)
    assert not torch.allclose(once.get_batch(0, 0).latents, mean)
    assert torch.equal(once.get_batch(0, 0).latents, once.get_batch(3, 9).latents)
    rand = _prepared(_config(tmp_path, latent_sampling="random"), fake_model)
    assert not torch.equal(rand.get_batch(0, 0).latents, rand.get_batch(1, 0).latents)
    assert torch.equal(rand.get_batch(1, 0).latents, rand.get_batch(1, 0).latents)


def test_alpha_weight_in_batch(tmp_path: Path, make_image, fake_model):
    make_image(tmp_path / "a.png", (64, 64), "RGBA")
    make_image(tmp_path / "b.png", (64, 64), "RGB", seed=1)
    dataset = _prepared(_config(tmp_path, use_alpha_weight=True, batch_size=2), fake_model)
    batch = dataset.get_batch(0, 0)
    assert batch.loss_weight.shape == (2, 1, 8, 8)
    rgba = batch.image_paths.index(str(tmp_path / "a.png"))
    weight = batch.loss_weight[rgba]
    assert abs(float(weight.min())) < 1e-6 and abs(float(weight.mean()) - 1) < 1e-5
    assert torch.equal(batch.loss_weight[1 - rgba], torch.ones(1, 8, 8))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16"])
def test_every_image_mode_trains(tmp_path: Path, make_image, fake_model, mode: str):
    if mode == "I;16":
        Image.fromarray((torch.rand(40, 48) * 65535).to(torch.int32).numpy().astype("uint16")).save(tmp_path / "x.png")
    elif mode == "LA":
        make_image(tmp_path / "x.png", (48, 40), "RGBA")
        Image.open(tmp_path / "x.png").convert("LA").save(tmp_path / "x.png")
    else:
        make_image(tmp_path / ("x.jpg" if mode == "CMYK" else "x.png"), (48, 40), mode)
    batch = _prepared(_config(tmp_path, use_alpha_weight=True), fake_model).get_batch(0, 0)
    assert batch.latents.shape == (1, 4, 8, 8) and torch.isfinite(batch.latents).all()
    assert torch.isfinite(batch.loss_weight).all()
    if mode in ("LA", "RGBA"):
        assert float(batch.loss_weight.min()) < 0.5


def test_one_pixel_image_is_upscaled(tmp_path: Path, make_image, fake_model):
    make_image(tmp_path / "dot.png", (1, 1))
    batch = _prepared(_config(tmp_path), fake_model).get_batch(0, 0)
    assert batch.latents.shape == (1, 4, 8, 8)
    assert batch.size_cond[0].tolist() == [1, 1, 0, 0, 64, 64]


def test_corrupt_image_among_good_ones_is_skipped(folder: Path, fake_model):
    (folder / "zzz.png").write_bytes(b"broken")
    dataset = _prepared(_config(folder), fake_model)
    assert len(dataset) == 4 and [p.name for p, _ in dataset.unreadable] == ["zzz.png"]
    assert (folder / "zzz.png").read_bytes() == b"broken"


def test_batch_larger_than_dataset(folder: Path):
    with pytest.raises(DatasetError) as info:
        ImageDataset(_config(folder, batch_size=9))
    assert "9" in str(info.value) and "4" in str(info.value)


def test_cache_hits_and_invalidation(tmp_path: Path, make_image, make_model):
    path = make_image(tmp_path / "a.png")
    cache, model = LatentCache(tmp_path / "cache"), make_model()
    _drawn(_config(tmp_path), model, cache)
    assert model.encode_calls == 1
    _drawn(_config(tmp_path), model, LatentCache(tmp_path / "cache"))  # same inputs, from disk
    assert model.encode_calls == 1
    _drawn(_config(tmp_path, width=128), model, cache)  # other resolution
    assert model.encode_calls == 2
    _drawn(_config(tmp_path, flip_p=0.5), model, cache)  # adds the flipped variant only
    assert model.encode_calls == 3
    other_vae = make_model("ffffffffff")
    _drawn(_config(tmp_path), other_vae, cache)
    assert other_vae.encode_calls == 1
    make_image(path, seed=99)  # the image is edited in place
    _drawn(_config(tmp_path), model, cache)
    assert model.encode_calls == 4


def test_random_crop_is_fixed_per_image(tmp_path: Path, make_image, fake_model):
    for i in range(4):
        make_image(tmp_path / f"{i}.png", (256, 64), seed=i)
    config = _config(tmp_path, crop="random")
    lefts = [plan.left for plan in ImageDataset(config).plans]
    assert lefts == [plan.left for plan in ImageDataset(config).plans]
    assert all(0 <= left <= 192 for left in lefts) and len(set(lefts)) > 1
    assert [plan.left for plan in ImageDataset(replace(config, crop_seed=1)).plans] != lefts
    dataset = _prepared(config, fake_model)
    for index in range(4):
        batch = dataset.get_batch(index, 0)
        image = [str(r.path) for r in dataset.records].index(batch.image_paths[0])
        assert batch.size_cond[0].tolist() == [64, 256, 0, lefts[image], 64, 64]


def test_own_size_mode_progress_and_prepare_first(tmp_path: Path, make_image, fake_model):
    make_image(tmp_path / "a.png", (100, 60))
    make_image(tmp_path / "b.png", (64, 64), seed=1)
    dataset = ImageDataset(_config(tmp_path, resize_mode="none"))
    with pytest.raises(RuntimeError, match="prepare"):
        dataset.get_batch(0, 0)
    calls = []
    dataset.prepare(fake_model, lambda done, total: calls.append((done, total)))
    assert calls == [] and fake_model.encode_calls == 0  # nothing is encoded before a batch draws it
    first = dataset.get_batch(0, 0)
    assert fake_model.encode_calls == 1 and torch.equal(dataset.get_batch(0, 0).latents, first.latents)
    assert fake_model.encode_calls == 1  # kept for later draws
    shapes = sorted(tuple(dataset.get_batch(i, 0).latents.shape) for i in range(dataset.batches_per_epoch()))
    assert shapes == [(1, 4, 8, 8), (1, 4, 8, 16)]
    assert dataset.get_batch(0, 0).pixels is None


def test_a_batch_is_the_same_whatever_was_drawn_before_it(tmp_path: Path, make_image, make_model):
    """Encoding on first use must not make a batch depend on the draws before it (a resumed run starts mid-way)."""
    for i in range(5):
        make_image(tmp_path / f"{i}.png", (96, 64), seed=i)
    config = _config(tmp_path, latent_sampling="once", flip_p=0.5, crop="random", batch_size=2, repeats=2)
    forward = _prepared(config, make_model())
    straight = [forward.get_batch(index, 3) for index in range(12)]
    backward, model = _prepared(config, make_model()), make_model()
    resumed = _prepared(config, model)
    for index in reversed(range(12)):
        batch = backward.get_batch(index, 3)
        assert torch.equal(batch.latents, straight[index].latents) and batch.prompts == straight[index].prompts
    late = resumed.get_batch(9, 3)  # a run resumed at batch 9 encodes only what batch 9 draws
    drawn = set(zip(late.image_paths, late.extras["flipped"]))
    assert torch.equal(late.latents, straight[9].latents) and model.encode_calls == len(drawn)
