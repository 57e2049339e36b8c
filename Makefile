# Two entry points that do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fliqs-installed
export TVM_NUM_THREADS ?= 2
export OMP_NUM_THREADS ?= 2

.PHONY: demo test test-fast bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the local CPU build of torch; a looser spec pulls a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fliqs demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=30 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python bench/fake_quant.py

clean:
	rm -rf $(VENV) build *.egg-info fliqs-out
