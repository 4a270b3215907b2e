# Set-up and the two commands the README documents: `make run` and `make test`.
# torch==2.13.0 is installed first: it is the local CPU build (an unpinned torch pulls CUDA).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1

# Checked by `make lint` (ruff and mypy; settings in pyproject.toml), the first step of `make test`.
LINT_PATHS := nlrewrite_core tasks flows

.PHONY: install run lint test bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/nlrewrite run --preset tiny $(ARGS)

lint: install
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/mypy

# The suite runs in two pytest-xdist workers, one test file per worker at a time (`--dist loadfile`:
# a file's module fixtures, such as the end-to-end cluster, are set up once), each with one torch
# thread (two workers of two threads on two cores would fight for them). Session fixtures (the
# Prefect test server, the shared micro runs) are made once per worker. One file alone, in one
# process: `.venv/bin/python -m pytest tests/test_flow.py`.
test: install lint
	@./.ci/ensure-test-deps.sh
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests -q -n 2 --dist loadfile --durations=15

bench: install
	$(BIN)/python benchmarks/pipeline_cache.py
	$(BIN)/python benchmarks/latent_cache.py
