# mlmesh: `make up` serves the whole mesh, `make test` runs the suite. Both install what they need.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install up test test-unit lint bench clean

install:
	@bash scripts/setup.sh

up: install
	@$(VENV)/bin/mlmesh up

test: install
	@bash scripts/test.sh

test-unit: install
	@$(PY) -m pytest tests/unit -q

lint: install
	@$(VENV)/bin/ruff check .

bench: install
	@$(PY) -m bench.run

clean:
	rm -rf $(VENV) .cache .mlmesh services/common/gen
