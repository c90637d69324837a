# gdn2-jax: every target creates the environment it needs (.venv, Python 3.12) on first use, with the exact
# versions CI tests (constraints.txt; pyproject.toml states compatible ranges).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv test test-all train lint clean-venv

# Python 3.12: $PYTHON if set, else a python3.12 that runs, else pyenv's 3.12.x (its shim needs PYENV_VERSION).
define find_python
for c in "$${PYTHON:-}" python3.12 "$$(PYENV_VERSION=3.12.1 pyenv which python3.12 2>/dev/null)" \
         "$$(ls -d $$HOME/.pyenv/versions/3.12.*/bin/python3.12 2>/dev/null | tail -n1)" /usr/bin/python3.12; do \
  [ -n "$$c" ] && "$$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$$c"; exit 0; }; \
done; exit 1
endef

$(VENV)/.installed: pyproject.toml constraints.txt
	@py=$$( $(find_python) ) || { echo "error: Python 3.12 not found (jax 0.11 needs it). Install it, or set PYTHON=/path/to/python3.12." >&2; exit 1; }; \
	echo "creating $(VENV) with $$py"; \
	"$$py" -m venv $(VENV) && $(PY) -m pip install -q -U pip && $(PY) -m pip install -q -c constraints.txt -e ".[train,dev]"
	@touch $@

venv: $(VENV)/.installed

# The fast tier (CI): everything but the exhaustive sweeps marked `slow`.
test: venv
	$(PY) -m pytest -q -m "not slow" -n 2 --timeout=900 $(PYTEST_ARGS)

# Everything, the slow sweeps included.
test-all: venv
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

# The main job: train a small GDN-2 language model on an embedded default corpus, on the CPU.
train: venv
	$(PY) -m train.main $(ARGS)

clean-venv:
	rm -rf $(VENV)
