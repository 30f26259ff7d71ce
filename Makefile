# gmai-rl: every target sets up what it needs. `make demo` and `make test` work on a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Every install passes the one constraints file, so no dependency can pull another torch build.
CONSTRAINTS := -c constraints.txt

.PHONY: install test test-slow lint format demo clean

install: $(STAMP)

# Re-runs only when the dependency declarations change; otherwise a no-op.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(CONSTRAINTS) -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

lint: install
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests
	$(PY) -m mypy

format: install
	$(PY) -m ruff format src tests
	$(PY) -m ruff check --fix src tests

demo: install
	$(PY) -m gmai_rl.demo

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .mypy_cache
