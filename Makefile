# Two commands on a fresh machine: `make train` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The PyTorch pair this project is tested with (pip takes both from this machine's disk).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-fast train bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev,peers,integrations,models]"
	touch $(STAMP)

install: $(STAMP)

# The full suite: what the README's test command and CI run.
test: $(STAMP)
	$(BIN)/python -m pytest -q

# For the edit loop: the tests not marked slow (slow: end-to-end training runs and launched
# jobs), stopping at the first failure. Not a substitute for `make test`.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m 'not slow'

# The main job: AGD on Fashion-MNIST with an 8-layer, 256-wide FCN, no learning rate to tune.
# AGD_APT_INSTALL=1: when the files are neither in the data dir nor installed by Debian and no
# mirror answers, install Debian's dataset-fashion-mnist (root or passwordless sudo only), so
# this one command also sets up an offline machine (docs/data.md).
train: $(STAMP)
	AGD_APT_INSTALL=1 $(BIN)/agd train --arch fcn --dataset fashion-mnist --depth 8 --width 256 --epochs 3

bench: $(STAMP)
	$(BIN)/python benchmarks/step_overhead.py
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
