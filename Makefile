# The two commands a newcomer needs: `make run` and `make test`. Both set up everything
# (`make run TORCH=cuda` for a GPU build of torch; see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist
CONFIG ?= configs/quickstart.toml
ARGS ?=
# pytest workers for `make test` (pytest-xdist): one per core, at most 4; TEST_WORKERS=0 runs in one process
TEST_WORKERS ?= auto --maxprocesses=4

.PHONY: run test test-slow coverage setup setup-test data bench clean

# torch is installed first, so that no dependency pulls another build. TORCH=cpu (the default): the
# wheel in pip's find-links when there is one (these machines: a CPU wheel in /opt/wheels), else the
# CPU build from PyTorch's CPU index (PyPI's Linux wheel is the multi-GB CUDA build); its dependencies
# then come from the package index. TORCH=cuda: PyPI's default (CUDA) build, with the machine's pip
# configuration (find-links holding a CPU wheel) set aside.
TORCH ?= cpu
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
ifeq ($(TORCH),cpu)
	$(BIN)/pip install --quiet --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null || \
	  $(BIN)/pip install --quiet --no-deps "torch==$(TORCH_VERSION)+cpu" --index-url $(TORCH_CPU_INDEX)
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"  # its dependencies, from the package index
else ifeq ($(TORCH),cuda)
	PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
else
	@echo "TORCH must be cpu or cuda, got $(TORCH)"; exit 2
endif

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

# one install (one resolve, one editable build) for semfl and its test extras, not two in a row
$(VENV)/.installed-test: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(VENV)/.installed $@

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

# line coverage of the default suite (what `make test` runs), per file in the terminal and in coverage.json;
# compare the TOTAL line before and after a change that moves or removes tests
coverage: setup-test
	$(BIN)/pip install --quiet 'pytest-cov>=5'
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --cov=semfl --cov-report=term --cov-report=json:coverage.json

bench: setup
	$(BIN)/pip install --quiet -e '.[flower]'  # Ray: Flower's simulation engine, the baseline
	OMP_NUM_THREADS=1 $(BIN)/semfl bench $(ARGS)

clean:
	rm -rf $(VENV) runs
