# Two entry points (see README): `make demo` and `make test`. Both create/update .venv/ here.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.effroll-installed
MODEL_NAME := smollm2-135m

.PHONY: demo test venv model clean-venv

venv: $(STAMP)

# torch first: on CPU x86-64 machines `torch==2.13.0` resolves to the CPU build on local disk;
# on CUDA machines install a CUDA torch into .venv beforehand (README) and this step keeps it.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,gguf]'
	@touch $(STAMP)

model: venv
	@$(VENV)/bin/effroll fetch $(MODEL_NAME) | tail -n 1 > $(VENV)/.model-path
	@echo "model: $$(cat $(VENV)/.model-path)"

test: venv model
	EFFROLL_MODEL=$$(cat $(VENV)/.model-path) $(PY) -m pytest

demo: venv model
	$(PY) experiments/demo.py --model "$$(cat $(VENV)/.model-path)"

clean-venv:
	rm -rf $(VENV)
