# The two commands a newcomer needs: `make run` and `make test`. Both set up everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist
CONFIG ?= configs/quickstart.toml
ARGS ?=
# pytest workers for `make test` (pytest-xdist): one per core, at most 4; TEST_WORKERS=0 runs in one process
TEST_WORKERS ?= auto --maxprocesses=4

.PHONY: run test test-slow setup setup-test data bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the CPU wheel of torch first, so no dependency pulls a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed data
setup-test: $(VENV)/.installed-test data

# Debian's Fashion-MNIST package, when missing and apt is usable (root or sudo)
data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ] && [ -z "$$SEMFL_DATA" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) && echo "installed dataset-fashion-mnist"; \
	  elif command -v sudo >/dev/null; then sudo apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST missing and apt unusable: semfl will try the official download"; fi; \
	fi

run: setup
	$(BIN)/semfl run $(CONFIG) $(ARGS)

test: setup-test
	$(BIN)/lint-imports --no-cache  # the layers of the house (pyproject.toml [tool.importlinter])
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test-slow: setup-test
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/pip install --quiet -e '.[flower]'  # Ray: Flower's simulation engine, the baseline
	OMP_NUM_THREADS=1 $(BIN)/semfl bench $(ARGS)

clean:
	rm -rf $(VENV) runs
