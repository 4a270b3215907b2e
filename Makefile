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

test: install lint
	@./.ci/ensure-test-deps.sh
	$(BIN)/python -m pytest tests -q

bench: install
	$(BIN)/python benchmarks/pipeline_cache.py
	$(BIN)/python benchmarks/latent_cache.py
