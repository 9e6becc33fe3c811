# `make test` and `make lint` do all the set-up on a fresh machine: they create .venv, install
# the pinned tools (requirements-dev.txt) and build the extension from source.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CXX_SOURCES = $(shell find cpp cuda -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
PY_SOURCES = python tests benchmarks scripts

.PHONY: venv build test lint format bench clean

venv: $(STAMP)
$(STAMP): requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

# Incremental: scikit-build-core keeps its CMake tree in build/. QLORA_EXT_CUDA=0 skips CUDA.
build: $(STAMP)
	$(BIN)/pip install --no-build-isolation --no-deps --quiet .
	$(BIN)/python -c "import qlora_ext; print('qlora_ext build:', qlora_ext.build_info())"

# The static CUDA checks (registers, spills, key SASS) run whenever CUDA kernels were built.
test: build
	$(BIN)/python scripts/check_cuda_build.py
	$(BIN)/python -m pytest tests -q

lint: $(STAMP)
	$(BIN)/ruff check $(PY_SOURCES)
	$(BIN)/ruff format --check $(PY_SOURCES)
	$(BIN)/clang-format --dry-run --Werror $(CXX_SOURCES)

format: $(STAMP)
	$(BIN)/ruff check --fix $(PY_SOURCES)
	$(BIN)/ruff format $(PY_SOURCES)
	$(BIN)/clang-format -i $(CXX_SOURCES)

bench: build
	$(BIN)/python benchmarks/bench_quant.py

clean:
	rm -rf build $(VENV)
