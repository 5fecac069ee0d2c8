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

# Pretrain the tiny model on the synthetic set (written on first use) and sample it (50 steps,
# CFG 5); distill it with DMD-2 into an 8-step student and sample that (8 steps, no CFG).
demo: $(STAMP)
	$(PY) -m train pretrain +experiment=demo hydra.run.dir=$(DEMO_DIR)/pretrain
	$(PY) -m train sample ckpt=$(DEMO_DIR)/pretrain/export/model.safetensors steps=50 cfg=5.0 seed=0 \
		prompt="$(DEMO_PROMPT)" out=$(DEMO_DIR)/teacher_sample.mp4
	$(PY) -m train distill +experiment=demo_distill teacher=$(DEMO_DIR)/pretrain/export/model.safetensors \
		hydra.run.dir=$(DEMO_DIR)/distill
	$(PY) -m train sample ckpt=$(DEMO_DIR)/distill/export/model.safetensors seed=0 \
		prompt="$(DEMO_PROMPT)" out=$(DEMO_DIR)/student_sample.mp4
	@echo "demo: runs $(DEMO_DIR)/pretrain and $(DEMO_DIR)/distill (checkpoints/, export/, samples/, wandb/);" \
		"samples $(DEMO_DIR)/teacher_sample.mp4 (50 steps, CFG 5) and $(DEMO_DIR)/student_sample.mp4 (8 steps, no CFG)"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
