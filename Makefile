# The two commands a new user runs: `make run` and `make test`.
# `make run` installs the core and the llamacpp extra (xllamacpp, a prebuilt wheel: nothing
# compiles) and serves the real default model (fetched once, apiary/realmodel.py); `ECHO=1`
# runs the echo demo instead (core only); `APIARY_MODEL=FILE.gguf make run` serves any GGUF.
# `make test` adds the dev tools.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CORE   := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev
LLAMA  := $(VENV)/.installed-llamacpp
PROTOS := $(wildcard protos/v1/*.proto)
GENERATED := protos/v1/.generated

.PHONY: all install proto run test lint bench clean

all: test

install: $(DEV)

# The editable install runs the build step (setup.py) that compiles protos/v1/*.proto.
$(CORE): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@ $(GENERATED)

$(DEV): $(CORE)
	$(PY) -m pip install -q -e '.[dev,llamacpp]'
	touch $(LLAMA) $@

$(LLAMA): $(CORE)
	$(PY) -m pip install -q -e '.[llamacpp]'
	touch $@

proto: $(GENERATED)

# The proto path is the import path: `from protos.v1 import queen_pb2`.
$(GENERATED): $(PROTOS) $(CORE)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# APIARY_MODEL=path/to/model.gguf make run: the same cluster on another GGUF; ECHO=1: echo demo.
run: proto $(if $(ECHO),,$(LLAMA))
	$(VENV)/bin/apiary up $(if $(ECHO),--echo)

# The grpc-js interop test's client (skipped, saying why, where Node.js/npm are missing).
JS := tests/interop/js
JS_INSTALLED := $(JS)/node_modules/.installed

$(JS_INSTALLED): $(JS)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		((cd $(JS) && npm ci --no-audit --no-fund --silent) && touch $@) \
			|| echo "npm ci failed: the grpc-js interop test will be skipped"; \
	else echo "npm not found: the grpc-js interop test will be skipped"; fi

test: $(DEV) proto $(JS_INSTALLED)
	$(PY) -m pytest

lint: $(DEV) proto
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(DEV) proto
	$(PY) bench/route.py

clean:
	rm -rf $(VENV) $(GENERATED) protos/v1/*_pb2*.py protos/v1/*_pb2*.pyi .mypy_cache \
		.pytest_cache $(JS)/node_modules build *.egg-info
