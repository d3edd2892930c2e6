"""scripts/aesthetic_gradients.py as the WebUI runs it: an AlwaysVisible section in txt2img and img2img, applied
through the WebUI's own conditioning path inside a generation, its hook gone afterwards whatever happens, its
infotext pasted back, its embeddings listed from the WebUI's folders without a restart."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune_core.aesthetic.personalized_text import PersonalizedText
from finetune_core.formats.aesthetic import write_aesthetic_files

REPO = Path(__file__).resolve().parents[2]
ON = {"weight": 0.9, "steps": 5.0, "lr": "0.001", "embedding": "style"}


@pytest.fixture()
def section(webui):
    """The script loaded by the WebUI's loader, and a txt2img runner with its UI built (default argument values)."""
    import gradio as gr
    from modules import script_callbacks, scripts

    script_callbacks.clear_callbacks()
    scripts.scripts_data.clear()
    module = scripts.load_script(str(REPO / "scripts" / "aesthetic_gradients.py"))
    runners = {}
    for is_img2img in (False, True):
        runner = scripts.ScriptRunner()
        runner.initialize_scripts(is_img2img)
        with gr.Blocks():
            runner.setup_ui()
        runners[is_img2img] = runner
    yield module, runners
    scripts.scripts_data.clear()


def embedding_file(webui, width=768, name="style", seed=0, folder=None):
    generator = torch.Generator().manual_seed(seed)
    folder = folder or Path(webui.paths_internal.models_path) / "aesthetic_embeddings"
    return write_aesthetic_files(torch.randn(1, width, generator=generator),
                                 torch.randn(width, width, generator=generator) * width ** -0.5, {}, folder, name)


def args_for(runner, **changes):
    """The runner's script_args: the UI defaults, with the section's values changed by argument name."""
    names = ["weight", "steps", "lr", "slerp", "embedding", "text", "slerp_angle", "text_negative", "empty_prompts"]
    values = [None] + [c.value for c in runner.inputs[1:]]
    script = runner.alwayson_scripts[0]
    for name, value in changes.items():
        values[script.args_from + names.index(name)] = value
    return values


def generate(runner, sd_model, img2img=False, prompt="a photo of a cat", negative="", seed=1, **changes):
    from modules import processing

    kind = processing.StableDiffusionProcessingImg2Img if img2img else processing.StableDiffusionProcessingTxt2Img
    p = kind(sd_model=sd_model, prompt=prompt, negative_prompt=negative, steps=2, width=64, height=64, seed=seed,
             script_args=args_for(runner, **changes))
    p.scripts = runner
    try:
        return processing.process_images(p), p
    finally:
        p.close()


def pixels(processed):
    return np.asarray(processed.images[0], dtype=np.int16)


def hooks_left(sd_model):
    return [w for w in [sd_model.cond_stage_model] + list(getattr(getattr(sd_model, "conditioner", None),
                                                                   "embedders", []))
            if "process_tokens" in vars(w)]


def test_the_section_is_always_visible_with_the_originals_controls(section):
    _, runners = section
    for runner in runners.values():
        script = runner.alwayson_scripts[0]
        assert script.title() == "Aesthetic Gradients" and script.args_to - script.args_from == 9
        defaults = [c.value for c in runner.inputs[script.args_from:script.args_to]]
        assert defaults == [0.9, 5, "0.0001", False, "None", "", 0.1, False, False]
        assert [key for _, key in runner.infotext_fields] == [
            "Aesthetic weight", "Aesthetic steps", "Aesthetic LR", "Aesthetic slerp", "Aesthetic embedding",
            "Aesthetic text", "Aesthetic slerp angle", "Aesthetic text negative", "Aesthetic empty prompts"]


def test_generation_with_the_section_on_and_off(section, sd1, webui):
    module, runners = section
    embedding_file(webui)
    runner = runners[False]
    off, _ = generate(runner, sd1)
    on, p = generate(runner, sd1, **ON)
    assert np.abs(pixels(on) - pixels(off)).max() > 0
    assert "Aesthetic embedding: style" in on.info and "Aesthetic LR: 0.001" in on.info
    assert "Aesthetic" not in off.info
    cache = module.SECTION.library.cache
    assert cache.optimisations == 1  # the prompt's chunk; the empty negative prompt is left alone
    # The WebUI's persistent conditioning cache must not hand the section's conditioning to a plain generation.
    off_again, _ = generate(runner, sd1)
    assert np.array_equal(pixels(off_again), pixels(off))
    on_again, _ = generate(runner, sd1, seed=1, **ON)
    assert np.array_equal(pixels(on_again), pixels(on)) and cache.optimisations == 1
    other_seed, _ = generate(runner, sd1, seed=2, **ON)
    assert cache.optimisations == 1  # the seed does not matter to the conditioning
    for quiet in ({"weight": 0.0}, {"steps": 0.0}, {"embedding": "None"}):
        same, _ = generate(runner, sd1, **{**ON, **quiet})
        assert np.array_equal(pixels(same), pixels(off)), quiet
    img2img, _ = generate(runners[True], sd1, img2img=True, **ON)
    assert np.array_equal(pixels(img2img), pixels(on))
    assert not hooks_left(sd1)


def test_the_hook_is_gone_after_a_failing_generation(section, sd1, webui, monkeypatch):
    module, runners = section
    embedding_file(webui)

    def broken_unet(*args, **kwargs):
        raise RuntimeError("the GPU fell over")

    sd1.apply_model = broken_unet
    with pytest.raises(RuntimeError, match="fell over"):
        generate(runners[False], sd1, **ON)
    assert not hooks_left(sd1)
    del sd1.apply_model

    def broken_optimisation(*args):
        raise RuntimeError("the optimisation fell over")

    monkeypatch.setattr(PersonalizedText, "_personalise", broken_optimisation)  # raises inside the hooked call
    with pytest.raises(RuntimeError, match="optimisation fell over"):
        generate(runners[False], sd1, prompt="another prompt", **ON)
    monkeypatch.undo()
    assert not hooks_left(sd1)
    plain, _ = generate(runners[False], sd1)  # and generation works as before
    assert plain.images


@pytest.mark.parametrize("changes, message", [
    ({"lr": "fast"}, "Aesthetic learning rate \\(aesthetic_lr\\) must be a number"),
    ({"weight": 1.5}, "aesthetic weight must be between 0 and 1"),
    ({"steps": 80.0}, "aesthetic steps must be between 0 and 50"),
    ({"embedding": "gone"}, "there is no aesthetic embedding 'gone'"),
    ({"embedding": "wide"}, "text width is 1024, but this SD1 model"),
])
def test_bad_settings_fail_the_generation_with_one_sentence(section, sd1, webui, changes, message):
    _, runners = section
    embedding_file(webui)
    embedding_file(webui, width=1024, name="wide")
    with pytest.raises(Exception, match=message) as error:
        generate(runners[False], sd1, **{**ON, **changes})
    assert str(error.value).startswith("Aesthetic Gradients: ") and "\n" not in str(error.value)
    # The WebUI's API answers `JSONResponse(status_code=vars(e).get('status_code', 500), {"detail": vars(e).get(
    # 'detail', ''), ...})` (modules/api/api.py, handle_exception): a 400 whose detail is the sentence, not a 500.
    assert vars(error.value).get("status_code", 500) == 400 and vars(error.value).get("detail") == str(error.value)
    assert not hooks_left(sd1)


def test_pasting_an_images_parameters_restores_the_settings(section, sd1, webui):
    from modules import infotext_utils

    _, runners = section
    embedding_file(webui, name="my, style")  # a name the infotext has to quote
    runner = runners[False]
    chosen = {"weight": 0.42, "steps": 7.0, "lr": "0.0002", "slerp": True, "embedding": "my, style",
              "text": "a sunny day", "slerp_angle": 0.25, "text_negative": True}
    processed, _ = generate(runner, sd1, **chosen)
    params = infotext_utils.parse_generation_parameters(processed.info)
    pasted = infotext_utils.paste_values(runner.infotext_fields, params)
    script = runner.alwayson_scripts[0]
    expected = args_for(runner, **chosen)[script.args_from:script.args_to]
    assert pasted[:8] == expected[:8]


def test_embeddings_are_listed_from_both_folders_without_a_restart(section, sd1, webui):
    module, _ = section
    library = module.SECTION.library
    assert library.names() == ["None"]
    embedding_file(webui, name="ours")
    original = Path(webui.paths_internal.extensions_dir) / "stable-diffusion-webui-aesthetic-gradients"
    torch.save(torch.randn(1, 768), (original / "aesthetic_embeddings").mkdir(parents=True) or
               original / "aesthetic_embeddings" / "laion_7plus.pt")
    assert library.names() == ["None", "laion_7plus", "ours"]


def test_an_original_pt_applies_with_the_clip_setting(section, sd1, webui, tmp_path):
    from tests.aesthetic.clip_fixtures import transformers_clip

    _, runners = section
    folder = Path(webui.paths_internal.models_path) / "aesthetic_embeddings"
    folder.mkdir(parents=True)
    torch.save(torch.randn(768), folder / "shipped.pt")  # the shipped laion_7plus.pt is 1-D
    with pytest.raises(Exception, match="set the CLIP model it was made with"):
        generate(runners[False], sd1, **{**ON, "embedding": "shipped"})
    webui.opts.data["finetune_aesthetic_clip"] = str(transformers_clip(tmp_path / "clip"))
    on, _ = generate(runners[False], sd1, **{**ON, "embedding": "shipped"})
    assert "Aesthetic embedding: shipped" in on.info


def test_generation_runs_inside_the_queue_lock_without_taking_it(section, sd1, webui):
    from modules import call_queue

    _, runners = section
    embedding_file(webui)
    result = {}

    def job():
        with call_queue.queue_lock:  # as txt2img's wrap_gradio_gpu_call holds it
            result["processed"], _ = generate(runners[False], sd1, **ON)

    worker = threading.Thread(target=job, daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "the section waited for the queue lock the generation holds"
    assert "Aesthetic embedding: style" in result["processed"].info


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_sd2_and_sdxl(section, webui, family):
    import tiny_webui_sdxl

    _, runners = section
    sd_model = tiny_webui_sdxl.build_sd2() if family == "sd2" else tiny_webui_sdxl.build_sdxl()
    embedding_file(webui, width=1024 if family == "sd2" else 1280)
    off, _ = generate(runners[False], sd_model)
    on, _ = generate(runners[False], sd_model, **ON)
    assert np.abs(pixels(on) - pixels(off)).max() > 0
    assert not hooks_left(sd_model)


def test_the_original_extension_installed_as_well_is_named(section, sd1, webui):
    _, runners = section
    embedding_file(webui)

    class AestheticCLIP:  # what the original's on_model_loaded puts on the wrapper
        def __init__(self, process_tokens):
            self.process_tokens = process_tokens

        def __call__(self, tokens, multipliers):
            return self.process_tokens(tokens, multipliers)

    sd1.cond_stage_model.process_tokens = AestheticCLIP(sd1.cond_stage_model.process_tokens)
    try:
        with pytest.raises(Exception, match="disable it in Extensions"):
            generate(runners[False], sd1, **ON)
    finally:
        del sd1.cond_stage_model.process_tokens
