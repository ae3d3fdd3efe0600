# lightning_seg: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
ARGS ?=
DATA_DIR ?=
REPORT_DIR ?=
DRY ?=
WHEELS ?= wheels
LOWEST ?= .venv-lowest

.PHONY: help setup train test test-all test-lowest lint format bench-overhead gpu-check gpu-wheels

help: ## show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[dev]"
	touch $@

setup: $(VENV)/.installed ## create .venv and install the project (TORCH=... picks the torch build)

train: setup ## train on the built-in synthetic task (extra Hydra overrides: ARGS="precision=bf16 ...")
	$(BIN)/python train.py $(ARGS)

test: setup ## run the test suite (the tests that train on real MSD cases skip where none are beside the checkout)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

test-all: setup ## run every test, slow ones included
	$(BIN)/python -m pytest $(ARGS)

# the floors come from pyproject.toml (.ci/floors.py); PyPI's torch for Linux is a CUDA build (about 3 GB
# of downloads), run here on the CPU. LIGHTNING_SEG_FLOORS: tests/test_package.py checks what was installed
test-lowest: ## run the tests at the lowest torch, Lightning, MONAI, Hydra, torchmetrics pyproject.toml admits
	$(PYTHON) -m venv $(LOWEST)
	$(PYTHON) .ci/floors.py > $(LOWEST)/floors.txt
	$(LOWEST)/bin/pip install --upgrade pip
	$(LOWEST)/bin/pip install -c $(LOWEST)/floors.txt torch
	$(LOWEST)/bin/pip install -c $(LOWEST)/floors.txt -e ".[dev]"
	LIGHTNING_SEG_FLOORS=$(LOWEST)/floors.txt $(LOWEST)/bin/python -m pytest -m "not slow" $(ARGS)

lint: setup ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench-overhead: setup ## Lightning step vs the plain MONAI loop on CPU (ARGS="--data-dir DIR": MSD folders)
	$(BIN)/python -m lightning_seg.study.bench.overhead $(ARGS)

gpu-check: ## the acceptance run on this machine's GPU (DATA_DIR=<MSD folders>: real data; DRY=1: tiny, CPU, CI)
	@py=$$( [ -x $(BIN)/python ] && echo $(BIN)/python || echo $(PYTHON) ); \
	$$py -c "import lightning_seg" 2>/dev/null || { echo "error: $$py cannot import lightning_seg: run 'make setup' or activate the env that has it"; exit 2; }; \
	$$py acceptance/gpu_check.py $(if $(DATA_DIR),--data-dir "$(DATA_DIR)") $(if $(REPORT_DIR),--report-dir "$(REPORT_DIR)") $(if $(DRY),--dry)

gpu-wheels: setup ## wheels of this venv's MONAI, Hydra, nibabel for a GPU machine without a registry, into $(WHEELS)/
	$(BIN)/pip freeze | grep -iE '^(monai|hydra-core|omegaconf|antlr4-python3-runtime|nibabel|importlib.resources)==' \
		> $(VENV)/gpu-wheels.txt
	$(BIN)/pip wheel --no-deps -r $(VENV)/gpu-wheels.txt -w $(WHEELS)
