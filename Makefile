# sam_lightning: `make demo` runs the CPU quickstart, `make test` the fast suite.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline

.PHONY: help install demo test test-property test-full lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,optuna,slurm,onnx]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with its dev tools, Optuna, submitit and ONNX export

demo: $(STAMP)  ## fine-tune the tiny SAM on synthetic shapes on the CPU (a few minutes)
	$(PY) -m sam_lightning.train experiment=quickstart

test: $(STAMP)  ## the fast test suite (CPU, minutes)
	$(PY) -m pytest -m "not slow and not gpu" -q

test-property: $(STAMP)  ## the Hypothesis properties with 500 fresh examples each (minutes)
	HYPOTHESIS_PROFILE=explore $(PY) -m pytest -m "hypothesis and not slow and not gpu" -q

test-full: $(STAMP)  ## every test, slow ones included (GPU tests skip without CUDA)
	$(PY) -m pytest -q

lint: $(STAMP)  ## ruff lint and format check, and the import layers contract (lint-imports)
	$(PY) -m ruff check sam_lightning tests experiments
	$(PY) -m ruff format --check sam_lightning tests experiments
	$(VENV)/bin/lint-imports

format: $(STAMP)  ## apply ruff formatting and safe fixes
	$(PY) -m ruff check --fix sam_lightning tests experiments
	$(PY) -m ruff format sam_lightning tests experiments

clean:  ## remove the venv, logs and caches
	rm -rf $(VENV) logs outputs multirun .pytest_cache .ruff_cache .hypothesis *.egg-info
