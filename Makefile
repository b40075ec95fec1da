# `make demo` and `make test` create the virtual environment when it is missing.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: venv demo test bench-env clean

venv: $(STAMP)

# torch first, alone and pinned: a bare `torch` requirement would pull several GB of CUDA wheels.
$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

# Real counts when this machine has them (pbmc3k, labelled), else the generated synthetic dataset.
DEMO_DATA := $(wildcard ../shared/data/pbmc3k_labeled.h5ad)

demo: $(STAMP)
	$(VENV)/bin/dje demo tune_configs/demo.yaml $(if $(DEMO_DATA),--data $(DEMO_DATA) --labels-key cell_type)

test: $(STAMP)
	$(PY) -m pytest

bench-env: $(STAMP)
	$(PIP) -e '.[test,bench]'

clean:
	rm -rf $(VENV) demo_output dje_results .pytest_cache
