# Two entry points on a fresh machine: `make run` (the demo pipeline) and `make test` (every test).
# Both create .venv on first use and install the pinned versions from constraints.txt.
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
# The CPU wheel of torch 2.13.0; on a GPU machine `make TORCH=torch==2.13.0 ...` from PyPI gets CUDA.
TORCH ?= torch==2.13.0
export PATH := $(BIN):$(PATH)
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: run test lint install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/kd run

lint: $(VENV)/.installed
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .prefect .kd
