# The two commands: `make run` (daemon on the embedded default) and `make test` (everything CI runs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: run test lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP_RUN): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(STAMP_TEST): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,dev]'
	touch $@ $(STAMP_RUN)

run: $(STAMP_RUN)
	$(BIN)/refreshd run

test: $(STAMP_TEST)
	bash scripts/test.sh

lint: $(STAMP_TEST)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check daemon catchers providers
	$(BIN)/lint-imports

typecheck: $(STAMP_TEST)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) refreshd.db*
