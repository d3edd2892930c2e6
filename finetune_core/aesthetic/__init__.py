"""Aesthetic Gradients in one place: creating an embedding from images (`gradients`, `clip_vision`), applying it to
the conditioning (`personalized_text`), the requests every host sends (`aesthetic_service`, `aesthetic_cli`), the
WebUI's txt2img/img2img section (`webui_script`) and its bench. The file format is `formats/aesthetic.py`; the tab
and REST routes are `ui/aesthetic_tab.py`."""
