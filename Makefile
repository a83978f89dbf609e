# The README's two commands:
#   make demo   set up (core install, no torch), run the whole pipeline on the bundled samples
#               with the offline template backend (dvc repro), print a summary
#   make test   set up (core + every extra, so model, SAM and training code is tested for real),
#               run the test suite; this is what .ci/run calls
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CORE   := $(VENV)/.installed-core
FULL   := $(VENV)/.installed-full
# the extras the tests exercise; torch/torchvision are pinned to builds on local disk
TEST_EXTRAS ?= dev,local,sam,train,geo
# the suite in TEST_WORKERS processes (pytest-xdist; CI has 2 cores); one module stays in one
# worker (--dist loadscope), so a module's fixtures (a build, a training run) are made once
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadscope

.PHONY: setup setup-test browser demo test test-all bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(CORE): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(FULL): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[$(TEST_EXTRAS)]"
	touch $@ $(CORE)

setup: $(CORE)
setup-test: $(FULL) browser

# Debian's chromium for the browser test of the HTML report (installed when missing, if we may)
browser:
	@bash tools/install-browser.sh

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	$(BIN)/geopixeld summary build

test: setup-test
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL)

test-all: setup-test
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) -m "slow or not slow"

bench: setup
	$(BIN)/python bench/prepare_plan.py

clean:
	rm -rf build metrics .pytest_cache
