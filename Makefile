# Development tasks. `make quickstart` and `make test` each set up what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned for development and CI only (a CPU build installs from local
# disk here: pip's find-links, which uv is given too); users get the ranges in
# each package's pyproject.toml. Every other dependency is pinned by
# constraints-dev.txt, so a CI result changes only with a change to this repo.
TORCH_PIN ?= torch==2.13.0
CONSTRAINTS := constraints-dev.txt
# the plugin template is a folder to copy, not a plugin of normal runs: it is
# not installed, and its tests load it from its folder
PACKAGES := core $(wildcard plugins/*) $(filter-out contrib/plait-plugin-template,$(wildcard contrib/*))
EDITABLE := $(foreach p,$(PACKAGES),$(if $(wildcard $(p)/pyproject.toml),-e $(p)))
# uv installs the rest several times faster than pip: the one on PATH, else one
# pip puts into the venv; when neither works, pip does it all
DEPS := -c $(CONSTRAINTS) -r requirements-dev.txt $(EDITABLE)
FIND_UV := command -v uv || { $(PIP) install -q uv >/dev/null 2>&1 && echo $(VENV)/bin/uv; }

.PHONY: install quickstart test test-floors test-floors-ci docs dist clean

$(VENV)/.installed: core/pyproject.toml $(wildcard plugins/*/pyproject.toml) $(wildcard contrib/*/pyproject.toml) requirements-dev.txt $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	uv=$$($(FIND_UV)); links=$${PIP_FIND_LINKS:-$$($(PIP) config get global.find-links 2>/dev/null)}; \
	if [ -n "$$uv" ]; then "$$uv" pip install -q --python $(PY) $${links:+--find-links $$links} "$(TORCH_PIN)" $(DEPS); \
	else $(PIP) install -q "$(TORCH_PIN)" && $(PIP) install -q $(DEPS); fi
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/plait quickstart examples/quickstart.yml

# The suite on TEST_WORKERS pytest-xdist workers (2: CI's two cores), each taking a whole test file at a
# time so that a module's fixtures (reference runs) are built once; conftest.py hands out the heaviest
# files first and gives torch one thread per process. `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 2
test: install $(VENV)/.bytecode
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# uv installs without bytecode (pip compiles it at install). Where PYTHONDONTWRITEBYTECODE is set, as on CI,
# nothing ever writes it, and each of the suite's Python processes (a few hundred: CLI runs, gloo launches)
# compiles torch's and transformers' imports again: 16 s instead of 7 s a process on 2 cores. Compiled once
# here (~30 s); compileall's status is ignored because some packages ship files that are not Python 3 on purpose.
$(VENV)/.bytecode: $(VENV)/.installed
	$(PY) -m compileall -q -j 0 $(VENV)/lib >/dev/null 2>&1 || true
	touch $@

# The floor environment: every dependency the packages declare at the lowest version its range
# admits (uv's lowest-direct resolution of the packages themselves, so no second list to drift),
# and the tests that exercise those libraries. torch stays at the pinned CPU build: its floor (2.11)
# is a multi-GB CUDA build on PyPI; the device machine's torch 2.11 runs bench/. pytest 8.4 because
# the newest needs pluggy>=1.6 and pluggy's floor is 1.5.
FLOORS_VENV := .venv-floors
FLOORS_TESTS ?= tests/test_train_loop.py tests/test_data_prepare.py tests/test_train_resume.py tests/test_checkpoint_safety.py \
	plugins/plait-formats plugins/plait-peft plugins/plait-bnb plugins/plait-models plugins/plait-kernels \
	plugins/plait-preference plugins/plait-vision
test-floors: install
	test -x $(FLOORS_VENV)/bin/python || $(PYTHON) -m venv $(FLOORS_VENV)
	uv=$$($(FIND_UV)); links=$${PIP_FIND_LINKS:-$$($(PIP) config get global.find-links 2>/dev/null)}; \
	"$$uv" pip install -q --python $(FLOORS_VENV)/bin/python $${links:+--find-links $$links} --resolution lowest-direct \
		"$(TORCH_PIN)" pytest==8.4.2 "liger-kernel>=0.8.5" $(EDITABLE)
	"$$($(FIND_UV))" pip list --python $(FLOORS_VENV)/bin/python 2>/dev/null | \
		grep -i -E '^(torch|transformers|peft|datasets|tokenizers|safetensors|pydantic|pluggy|bitsandbytes) '
	$(FLOORS_VENV)/bin/python -m pytest -q -p no:cacheprovider $(FLOORS_TESTS)

# CI's part of the floors (.ci/run, after `make test`): the tests that drive transformers', peft's and
# datasets' APIs hardest (the training loop, data preparation, LoRA, vision processors), about 3 minutes
# on 2 cores beside the environment's build; `make test-floors` runs the whole list above
FLOORS_CI_TESTS := tests/test_train_loop.py tests/test_data_prepare.py plugins/plait-peft plugins/plait-vision
test-floors-ci:
	$(MAKE) test-floors FLOORS_TESTS="$(FLOORS_CI_TESTS)"

# the documentation site, into site/ (tests/test_docs.py builds it in CI too)
docs: install
	$(PY) docs/gen/build_pages.py
	$(VENV)/bin/mkdocs build --strict

# sdist + wheel of every package, built and checked by twine (tests/test_packaging.py)
dist: install
	$(PY) -m pytest -q -m packaging tests/test_packaging.py

clean:
	rm -rf $(VENV) outputs site
