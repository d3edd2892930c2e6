# Set-up and everyday commands. `make demo` trains an embedding on the built-in tiny model; `make test` runs the tests.
# Both create the virtual environment on first use. torch and torchvision are installed as one pair (timm, which
# DreamArtist's discriminator uses, needs torchvision, and a torchvision built for another torch does not import).

VENV ?= .venv
PY := $(VENV)/bin/python
WEBUI_VENV ?= .venv-webui
WPY := $(WEBUI_VENV)/bin/python
TORCH ?= torch==2.14.1 torchvision==0.29.1
# The WebUI-pins venv: the WebUI's environment has no torchvision pair to test here, only torch.
WEBUI_TORCH ?= torch==2.13.0
OUT ?= outputs

.PHONY: setup demo ui test test-webui-pins lint bench clean gpu-proof

setup: $(VENV)/.installed

# pip's output goes to $(VENV)/install.log (shown only when an install fails): `make demo` prints our lines.
# open_clip_torch: the CLIP BPE vocabulary only (its own dependencies are not used).
PIP_LOG = $(VENV)/install.log
PIP = $(PY) -m pip install -q --disable-pip-version-check --no-input

$(VENV)/.installed: pyproject.toml
	@echo "Setting up $(VENV) (first use only; pip's output goes to $(PIP_LOG))"
	@python3 -m venv $(VENV)
	@{ $(PIP) --upgrade pip && $(PIP) $(TORCH) && $(PIP) -e '.[standalone,test]' && \
		$(PIP) --no-deps "open_clip_torch>=2.20"; } > $(PIP_LOG) 2>&1 || { tail -n 30 $(PIP_LOG); exit 1; }
	@touch $@

demo: setup
	@$(PY) -m finetune_core train textual-inversion --model tiny-sd1 --data examples/dataset --name demo-shapes \
		--init-text "shape" --vectors 2 --steps 40 --width 64 --height 64 --preview-every 20 --save-every 20 \
		--output-dir $(OUT) --overwrite

ui: setup
	$(PY) -m finetune_core ui --model tiny-sd1 --output-dir $(OUT)

# Passive OpenMP waiting: with other work on the machine, spinning threads make each step 10-50x slower.
# One pytest-xdist worker per core; work stealing evens out the few long training tests.
XDIST ?= -n auto --dist worksteal
test: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q $(XDIST)

# Host-facing tests again with the WebUI's pinned packages (gradio 3.41.2, transformers 4.30.2, pydantic 1, ...).
test-webui-pins: $(WEBUI_VENV)/.installed
	OMP_WAIT_POLICY=PASSIVE $(WPY) -m pytest -q $(XDIST) tests/webui tests/test_imports.py

$(WEBUI_VENV)/.installed: pyproject.toml
	python3 -m venv $(WEBUI_VENV)
	$(WPY) -m pip install -q --upgrade pip
	$(WPY) -m pip install -q "$(WEBUI_TORCH)"
	$(WPY) -m pip install -q gradio==3.41.2 transformers==4.30.2 "pydantic<2" fastapi==0.94.0 numpy==1.26.2 \
		safetensors==0.4.2 Pillow==9.5.0 httpx==0.24.1 pytest pytest-xdist ftfy regex
	$(WPY) -m pip install -q --no-deps open-clip-torch==2.20.0
	$(WPY) -m pip install -q --no-deps -e .
	touch $@

lint: setup
	$(VENV)/bin/ruff check finetune_core scripts tests install.py examples
	$(VENV)/bin/mypy

bench: setup
	$(PY) -m finetune_core bench

clean:
	rm -rf $(VENV) $(WEBUI_VENV) $(OUT)

# The no-GPU memory measurement against a real GPU (README "Memory: will it fit"): on a CUDA machine.
gpu-proof:
	python3 -m finetune_core.bench.gpu_proof --device cuda --models sd15-full,sdxl-full --steps 3 --json gpu-proof.json
