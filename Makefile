# facetag: reproducible set-up, tests, benchmarks and trainings.
# Every target that needs the virtualenv creates it when it is missing, so `make test`
# works on a clean clone.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch pinned to the build this project is tested with; override for another platform,
# e.g. `make setup TORCH_PIN="torch torchvision"`.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# Offline data: a local copy of the face datasets (see data/README.md).
FACETAG_DATA_DIR ?= $(abspath ../shared/data)
export FACETAG_DATA_DIR

.PHONY: setup install test lint fmt check gradcheck bench demo clean

setup: $(STAMP)
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 2>/dev/null || true
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

check: lint test

gradcheck: $(STAMP)
	$(BIN)/facetag gradcheck

bench: $(STAMP)
	$(BIN)/facetag bench train
	$(BIN)/facetag bench infer

demo: $(STAMP)
	$(BIN)/facetag gradcheck
	$(BIN)/facetag bench train --steps 5
	$(BIN)/facetag bench infer --steps 10

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
