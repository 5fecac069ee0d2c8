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

DEMO_DIR ?= runs/demo
DEMO_PROMPT ?= a red circle bounces off the floor with a click

# Pretrain the tiny model on the synthetic set (written on first use), then sample the teacher.
demo: $(STAMP)
	$(PY) -m train pretrain +experiment=demo hydra.run.dir=$(DEMO_DIR)/pretrain
	$(PY) -m train sample ckpt=$(DEMO_DIR)/pretrain/export/model.safetensors steps=50 cfg=5.0 seed=0 \
		prompt="$(DEMO_PROMPT)" out=$(DEMO_DIR)/teacher_sample.mp4
	@echo "demo: run directory $(DEMO_DIR)/pretrain (checkpoints/, export/, samples/, wandb/), sample $(DEMO_DIR)/teacher_sample.mp4"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
