# qlx: `make demo` and `make test` do all set-up on a fresh machine with Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test lint install install-test bench clean

$(VENV)/.runtime: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt requirements-test-nodeps.txt
	$(PIP) install -q -r requirements-test.txt
	$(PIP) install -q --no-deps -r requirements-test-nodeps.txt
	touch $@

install: $(VENV)/.runtime

install-test: $(VENV)/.test

demo: $(VENV)/.runtime
	$(VENV)/bin/qlx demo

test: $(VENV)/.test
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile --durations 25 tests

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info runs
