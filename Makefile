# Development tasks. `make quickstart` and `make test` each set up what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned for development and CI only (a CPU build installs from local
# disk here); users get the ranges in each package's pyproject.toml.
TORCH_PIN ?= torch==2.13.0
PACKAGES := core $(wildcard plugins/*) $(wildcard contrib/*)
EDITABLE := $(foreach p,$(PACKAGES),$(if $(wildcard $(p)/pyproject.toml),-e $(p)))

.PHONY: install quickstart test clean

$(VENV)/.installed: core/pyproject.toml $(wildcard plugins/*/pyproject.toml) $(wildcard contrib/*/pyproject.toml) requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -r requirements-dev.txt $(EDITABLE)
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/plait quickstart examples/quickstart.yml

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs
