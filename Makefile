# semcache-proxy: `make run` starts the proxy, `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONFIG ?= config/proxy.yaml
# The CPU build of torch. Where the registry only serves the CUDA build, point this at the CPU
# wheel index, e.g. TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: run test lint unit install install-test bench clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	touch $@

# torch first, so nothing that depends on it pulls the CUDA wheels
$(VENV)/.torch: $(VENV)/.created
	$(PIP) install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml constraints.txt
	$(PIP) install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: install
	$(PY) -m proxy serve --config $(CONFIG)

lint: install-test
	$(VENV)/bin/ruff check proxy tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: install-test lint
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
