from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pytest
from PIL import Image

from finetune_core.errors import ConfigError
from finetune_core.hosts.job_runner import JobRunner
from finetune_core.ui.actions import MethodActions
from finetune_core.ui.method_tab import method_sections
from finetune_core.ui.tab import build_tab
from tests.ui.conftest import planned

REQUIRED = ("train", "status", "progress", "loss_plot", "gallery", "result", "data_dir", "steps", "name", "refresh")


def _elem_ids(blocks: Any) -> set[str]:
    return {getattr(block, "elem_id", None) for block in blocks.blocks.values()} - {None}


def test_the_real_registry_builds_with_every_key_element(host: Any) -> None:
    from finetune_core.methods import METHODS

    blocks = build_tab(host, gr)
    ids = _elem_ids(blocks)
    for key in METHODS:
        slug = key.replace("-", "_")
        missing = [name for name in REQUIRED if f"finetune_{slug}_{name}" not in ids]
        assert not missing, f"{key}: missing {missing}"
    assert {"finetune_inspect_button", "finetune_inspect_result"} <= ids
    assert isinstance(blocks.finetune_runner, JobRunner)


def test_a_fake_method_gets_its_own_fields_and_create_section(host: Any, fake_methods: dict) -> None:
    service = SimpleNamespace(form_defaults=lambda m: {"train": {"steps": 7}})
    blocks = build_tab(host, gr, service=service, methods=fake_methods, train_js="finetune_start_training")
    ids = _elem_ids(blocks)
    assert {"finetune_fake_method_init_text", "finetune_fake_method_num_vectors", "finetune_fake_method_create",
            "finetune_fake_method_create_init_text", "finetune_fake_method_continue_from_refresh",
            "finetune_fake_method_template_refresh"} <= ids
    steps = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "finetune_fake_method_steps")
    assert steps.value == 7  # the method's form default wins over the dataclass default
    train = [d for d in blocks.config["dependencies"] if d.get("js") and "finetune_start_training" in d["js"]]
    assert len(train) == 1


def _actions(host: Any, fake_methods: dict, service: Any) -> MethodActions:
    spec = fake_methods["fake-method"]
    return MethodActions(host, JobRunner(host, train_fn=lambda *a, **k: None, output_kind=lambda m: "embeddings",
                                         check=planned),
                         service, spec.key, spec.output_kind, method_sections(spec, service))


def _values(**data: Any) -> dict:
    return {"method": {"num_vectors": 2.0}, "data": {"data_dir": "d", "batch_size": 2, "repeats": 3, **data},
            "train": {"steps": "12", "gradient_accumulation": 1}}


def test_actions_type_the_request_and_refuse_an_empty_name(host: Any, fake_methods: dict) -> None:
    actions = _actions(host, fake_methods, SimpleNamespace())
    request = actions.request(" ball ", _values())
    assert request.name == "ball" and request.method_settings["num_vectors"] == 2
    assert request.train_settings["steps"] == 12 and request.resume_run is None
    with pytest.raises(ConfigError, match="name is empty"):
        actions.request("", _values())
    assert actions.request("", _values(), resume_run="runs/x").resume_run == "runs/x"
    with pytest.raises(ConfigError, match="Max steps"):
        actions.request("b", {**_values(), "train": {"steps": "many"}})


def test_lint_shows_rows_thumbnails_and_step_maths(host: Any, fake_methods: dict, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (96, 64), "red").save(image)
    row = SimpleNamespace(path=image, size=(96, 64), caption="a red thing", bucket=(64, 64), tokens=4,
                          problems=["caption from file name"])
    service = SimpleNamespace(lint=lambda data, method, model: SimpleNamespace(rows=[row] * 4,
                                                                             format=lambda: "4 images"))
    table, maths = _actions(host, fake_methods, service).lint(_values())
    assert table.count("<img") == 8 and "a red thing" in table and "caption from file name" in table
    assert maths.startswith("4 images × 3 repeats × 2.00 epochs / batch 2 = 12 steps")


def test_presets_round_trip_through_the_logs_folder(host: Any, fake_methods: dict) -> None:
    actions = _actions(host, fake_methods, SimpleNamespace())
    assert actions.list_presets() == []
    message = actions.save_preset("my style", "ball", _values())
    assert "my style" in message and actions.list_presets() == ["my style"]
    name, values = actions.load_preset("my style")
    assert name == "ball" and values["train"]["steps"] == 12 and values["data"]["repeats"] == 3
    assert (host.folders().logs / "presets").is_dir()
    with pytest.raises(ConfigError, match="does not exist"):
        actions.load_preset("other")


def test_the_memory_estimate_measures_and_plans_a_fit_that_applies(host: Any, tiny_model: Any) -> None:
    from finetune_core.jobs import service
    from finetune_core.methods import METHODS

    host.model = tiny_model("tiny-sd1")
    spec = METHODS["dreambooth"]
    actions = MethodActions(host, JobRunner(host), service, spec.key, spec.output_kind,
                            method_sections(spec, service))
    values = {"method": {"prior_preservation": True, "class_prompt": "a dog"},
              "data": {"data_dir": "d", "width": 128, "height": 128},
              "train": {"precision": "fp32", "gradient_checkpointing": False}}
    text, none = actions.estimate(values)
    assert text.startswith("Measured without a GPU on tiny-sd1 in fp32: peak ") and "Give a card size" in text
    assert none == {}
    peak = float(text.split("peak ")[1].split(" GiB")[0])
    size = f"{int((peak * 0.8) * 1024 + 512)}MB"  # 80% of the peak, plus the card's reserve for CUDA
    text, plan = actions.estimate(values, size)
    assert "Plan: 8-bit AdamW" in text and plan["train"]["optimizer"] == "adamw8bit"


def test_texts_are_true_for_each_method(host: Any) -> None:
    from finetune_core.methods import METHODS

    blocks = build_tab(host, gr)
    markdown = [b.value for b in blocks.blocks.values() if isinstance(b, gr.Markdown) and "lora:NAME" in str(b.value)]
    assert markdown and all("&lt;lora:NAME:1&gt;" in text for text in markdown)  # shown with its brackets
    infos = {b.elem_id: b.info for b in blocks.blocks.values() if getattr(b, "elem_id", "") and
             str(b.elem_id).endswith("_name") and isinstance(b, gr.Textbox)}
    assert "instance token" in infos["finetune_dreambooth_name"] and "prompts" not in infos["finetune_lora_name"]
    assert "<lora:NAME:1>" in infos["finetune_lora_name"] and "NAME-neg" in infos["finetune_dreamartist_name"]
    assert "the word you write in prompts" in infos["finetune_textual_inversion_name"]
    assert len({infos[f"finetune_{key.replace('-', '_')}_name"] for key in METHODS}) == len(METHODS)


def test_each_method_tab_names_the_checkpoint_it_will_train_on(host: Any) -> None:
    from finetune_core.methods import METHODS

    blocks = build_tab(host, gr)
    lines = {b.elem_id: b for b in blocks.blocks.values() if str(getattr(b, "elem_id", "")).endswith("_checkpoint")}
    assert set(lines) == {f"finetune_{key.replace('-', '_')}_checkpoint" for key in METHODS}
    host.model_title = lambda: "switched.safetensors [abc]"  # a checkpoint switched after the page was built
    for block in lines.values():
        assert "Trains on: <b>fake.safetensors [0123456789]</b>" in block.value  # drawn when built
        redraw = block.load_event_to_attach[0]  # ... and again at every page load
        assert redraw() == "<div class='finetune-checkpoint'>Trains on: <b>switched.safetensors [abc]</b></div>"
