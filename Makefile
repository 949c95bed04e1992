# Quick start: `make demo` (the main job end to end on the simulated NPU) and `make test` (the whole suite).
# Each sets up its own virtual environment in .venv on a fresh machine (Python 3.10+, a C compiler).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rkedge-installed

.PHONY: demo test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml scripts/install-rknn-toolkit2.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[convert,serve,dev,rknn]'
	bash scripts/install-rknn-toolkit2.sh $(BIN)/python
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP) lint
	bash scripts/ci-system-deps.sh
	$(BIN)/python -m pytest -q

# The quality gates `make test` runs first: ruff (lint + import order) and mypy (configured in pyproject.toml:
# the whole package, strict on the board side).
lint: $(STAMP)
	$(BIN)/ruff check rkedge convert runtime lora boards tests scripts benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_runtime.py
	$(BIN)/python benchmarks/bench_server.py
	$(BIN)/python benchmarks/bench_rknn.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
