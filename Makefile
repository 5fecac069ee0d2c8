# `make test` and `make demo` work on a fresh machine with only Python 3.11: each creates the
# virtualenv if it is missing and installs the project into it first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test demo install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m train demo

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
