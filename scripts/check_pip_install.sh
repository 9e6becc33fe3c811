#!/usr/bin/env bash
# The README's "into an environment of your own" install, as a new user runs it: a fresh venv
# holding only torch and numpy, then `pip install --no-build-isolation .` (kernels only), then
# the ".[train]" extra, then the CLI. Proves that a missing optional dependency is one line
# naming the install command, and that the extra gives a working `qlora-ext finetune`.
# CPU-only build (QLORA_EXT_CUDA=0) and the CPU torch wheel: this checks packaging, not kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
VENV=${PIP_CHECK_VENV:-$(mktemp -d)/venv}
python3 -m venv "$VENV"
PIP="$VENV/bin/pip --quiet"
$PIP install torch==2.13.0 numpy
# --no-build-isolation builds with what the venv holds: the build tools, as the README says.
$PIP install scikit-build-core pybind11 cmake ninja
export QLORA_EXT_CUDA=0 HF_HUB_OFFLINE=1
# Its own CMake tree: the CPU-only configuration must not reconfigure the one `make build` keeps
# in build/ (that would make the next `make build` recompile every CUDA kernel).
BUILD=(-C build-dir=build/pip-check)
$PIP install --no-build-isolation "${BUILD[@]}" .
"$VENV/bin/python" -c "import qlora_ext; print('kernels only:', qlora_ext.build_info())"
"$VENV/bin/qlora-ext" finetune --help > /dev/null
set +e
err=$("$VENV/bin/qlora-ext" finetune --model /nonexistent --steps 1 2>&1 >/dev/null)
rc=$?
set -e
echo "without the extra: rc=$rc: $err"
[ "$rc" = 2 ] && [ "$(printf '%s\n' "$err" | wc -l)" = 1 ] && grep -q "pip install" <<< "$err" \
    || { echo "FAIL: a missing dependency must be one line naming the install command"; exit 1; }
$PIP install --no-build-isolation "${BUILD[@]}" ".[train]"
"$VENV/bin/qlora-ext" finetune --help > /dev/null
work=$(mktemp -d)
"$VENV/bin/python" -c "import sys; sys.path.insert(0, 'tests'); \
from tiny_hf_model import make_tiny_model_dir; make_tiny_model_dir('$work/tiny')"
"$VENV/bin/qlora-ext" finetune --model "$work/tiny" --steps 1 --train-size 8 --eval-size 2 \
    --batch-size 2 --seq-len 96 --output-dir "$work/run"
test -f "$work/run/adapter/adapter_config.json" || ls -R "$work/run"
echo "pip install check passed in $(( $(date +%s) - start )) s"
