# Two commands do all set-up on a fresh machine:
#   make run    prepares the shipped Polish sample and runs the default sweep on a local Ray
#   make test   runs the test suite (what .ci/run runs)
# Both create .venv on first use. PYTHON picks the interpreter (>= 3.11).
# make test-fast is the inner loop: the tests not marked slow (none of them starts Ray or a subprocess).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast install
run: $(STAMP)
	$(PY) -m sweep.run $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU-only machines take a small CPU build of torch when one is offered locally; elsewhere pip picks.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0+cpu" 2>/dev/null || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)
