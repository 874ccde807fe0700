# The two commands that do everything on a fresh machine:
#   make demo   whole pipeline on a small TakeCover config, ending in a real-environment score
#   make test   the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) run.py pipeline --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

bench: $(STAMP)
	$(PY) benchmarks/collect.py
	$(PY) benchmarks/vae_step.py
	$(PY) benchmarks/dream.py

clean-venv:
	rm -rf $(VENV)
