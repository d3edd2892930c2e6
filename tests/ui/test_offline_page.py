"""The standalone page asks nothing of the internet: no remote script, no Google Fonts (it must work offline)."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_the_standalone_page_and_its_theme_name_no_remote_address(tmp_path: Path) -> None:
    gr = pytest.importorskip("gradio")
    if int(gr.__version__.split(".")[0]) < 4:
        pytest.skip("the standalone app runs on Gradio 4")
    from fastapi.testclient import TestClient

    from finetune_core.hosts.standalone import StandaloneHost
    from finetune_core.ui.app import build_app

    demo, app, _ = build_app(StandaloneHost(str(tmp_path / "out"), "tiny-sd1"))
    page = TestClient(app).get("/").text
    assert "finetune_tab" in page or "gradio" in page.lower()
    assert "cdnjs" not in page and "fonts.gstatic.com" not in page and "fonts.googleapis.com" not in page
    assert [url for url in getattr(demo.theme, "_stylesheets", []) if "://" in url] == []  # Google Fonts
