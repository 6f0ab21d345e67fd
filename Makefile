# The README's two commands: `make demo` and `make test`. Both create or reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmm-installed
# The web chat's packages (gradio): `make test` and `make ui` need them, `make demo` does not.
UI_STAMP := $(VENV)/.mmm-ui-installed

# DeepSpeed JIT-builds its CPU ops once; keep them with the venv so reruns reuse them.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
export DS_ACCELERATOR := cpu
# Ray 2.60 turns token auth on by default; a local single-user cluster does not need it.
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo demo-real serve ui clean

install: $(STAMP)

# pip says only what went wrong (-qq); PIP_VERBOSE=1 shows all of it.
PIP := $(PY) -m pip install $(if $(PIP_VERBOSE),,-qq)

# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build here.
$(STAMP): pyproject.toml
	@echo "installing into $(VENV) (a few minutes, once) ..."
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	@$(PIP) -U pip wheel
	@$(PIP) -e '.[dev]'
	@touch $@

$(UI_STAMP): $(STAMP)
	@$(PIP) -e '.[dev,ui]'
	@touch $@

test: $(UI_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

# One line per step; every job's full output is in outputs/demo/logs/. VERBOSE=1 prints it all.
demo: $(STAMP)
	$(PY) -u jobs/demo.py $(if $(VERBOSE),--verbose,)

# The same chain on real pretrained weights (Whisper-base + SmolLM2-135M, materialised from registry
# packages) with spoken English and Malay: needs espeak-ng and alsa-utils (apt-get install).
demo-real: $(STAMP)
	$(PY) -u jobs/demo.py --preset small-real $(if $(VERBOSE),--verbose,)

# The OpenAI API on http://127.0.0.1:8000: the newest checkpoint under outputs/demo/, or CHECKPOINT=PATH
# (a stage-2 export, local or s3://). Its own local Ray binds 127.0.0.1 only; Ctrl-C stops both.
serve: $(STAMP)
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(VENV)/bin/serve run serve.app:build $(if $(CHECKPOINT),checkpoint=$(CHECKPOINT),)

# The web chat on http://127.0.0.1:7860 for a running `serve run serve.app:mmm`
# (MMM_API_BASE=http://HOST:PORT/v1 and MMM_API_KEY point it elsewhere).
ui: $(UI_STAMP)
	$(PY) ui/app.py

clean:
	rm -rf outputs/demo outputs/demo-real
