# sourcetrace: `make demo` runs the main job on an embedded default, `make test` runs the suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
EXTRAS ?= dev,bench,llm,views,corpus,diffusion,index,audio,kg
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	# kronfluence 1.0.1 declares torchvision but never imports it; the registry's torchvision does not
	# import beside the CPU torch, so it is installed without dependencies plus what it really uses.
	$(BIN)/pip install -q --no-deps kronfluence==1.0.1
	$(BIN)/pip install -q accelerate einops einconv opt-einsum
	# quanda 0.5.0 (the metric anchor of practitioner-tasks) declares torchvision, which does not import beside
	# the CPU torch; its metric modules need only these (installing them leaves torch and numpy as they are)
	$(BIN)/pip install -q --no-deps quanda==0.5.0
	$(BIN)/pip install -q datasets==5.2.0 torcheval==0.0.7 torchmetrics==1.9.0 lightning==2.6.6
	# browser tests drive Debian's Chromium (never a downloaded browser); they skip where it is missing
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium not installed: browser tests will be skipped"
	# fpcalc (Chromaprint), the fingerprinting anchor of the music benchmark
	command -v fpcalc >/dev/null || apt-get install -y -qq libchromaprint-tools >/dev/null \
		|| echo "fpcalc not installed: the Chromaprint rows of the music benchmark will be skipped"
	touch $(STAMP)

demo: setup
	$(BIN)/sourcetrace demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

bench: setup
	$(BIN)/sourcetrace bench digits-mlp

lint: setup
	$(BIN)/ruff check src tests tools
	# the layering of docs/architecture.md: layers, no cycles, no private names across packages
	PYTHONPATH=src:. $(BIN)/lint-imports --no-cache
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
