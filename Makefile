# The two commands a new user runs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PROTOS := $(wildcard protos/v1/*.proto)
GENERATED := protos/v1/.generated

.PHONY: all install proto run test lint bench clean

all: test

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,llamacpp]'
	touch $@

proto: $(GENERATED)

# The proto path is the import path: `from protos.v1 import queen_pb2`.
$(GENERATED): $(PROTOS) $(INSTALLED)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m grpc_tools.protoc -I . \
		--python_out=. --grpc_python_out=. --mypy_out=quiet:. --mypy_grpc_out=quiet:. $(PROTOS)
	touch $@

# APIARY_MODEL=path/to/model.gguf make run: the same cluster on a real model (llamacpp).
run: proto
	$(VENV)/bin/apiary up

# The grpc-js interop test's client (skipped, saying why, where Node.js/npm are missing).
JS := tests/interop/js
JS_INSTALLED := $(JS)/node_modules/.installed

$(JS_INSTALLED): $(JS)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		((cd $(JS) && npm ci --no-audit --no-fund --silent) && touch $@) \
			|| echo "npm ci failed: the grpc-js interop test will be skipped"; \
	else echo "npm not found: the grpc-js interop test will be skipped"; fi

test: proto $(JS_INSTALLED)
	$(PY) -m pytest

lint: proto
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: proto
	$(PY) bench/route.py

clean:
	rm -rf $(VENV) $(GENERATED) $(JS)/node_modules protos/v1/*_pb2*.py protos/v1/*_pb2*.pyi .mypy_cache .pytest_cache
