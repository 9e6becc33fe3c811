#!/usr/bin/env bash
# The GPU check: build from source, the CUDA tests, compute-sanitizer, the kernel benchmarks and
# the paged-optimizer spike test, in one command that ends by itself within 540 s and leaves four
# files in OUTDIR (Note [GPU check budget] in scripts/gpu_check.py, which runs the steps).
#
#   scripts/gpu_check.sh --prepare           # on a machine WITH network: fetch bitsandbytes
#                                            # 0.50.2, keep its Python files and
#                                            # libbitsandbytes_cuda130.so (under 10 MB) in
#                                            # .gpu_prep/, an ignored folder that travels with
#                                            # the working tree
#   scripts/gpu_check.sh OUTDIR              # on the GPU machine (device tool: OUTDIR = $OUT)
#   scripts/gpu_check.sh --dry-run OUTDIR    # here, no GPU: every step's plumbing, same files
set -uo pipefail
cd "$(dirname "$0")/.."
PREP=.gpu_prep
PY=${PYTHON:-python3}
if [[ -z "${PYTHON:-}" && -x .venv/bin/python && ! -e /dev/nvidia0 ]]; then
  PY=.venv/bin/python  # a dry run here uses the project's environment
fi

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

if [[ $# -lt 1 || "${!#}" == -* ]]; then
  echo "usage: scripts/gpu_check.sh [--dry-run] OUTDIR | --prepare" >&2
  exit 2
fi
if [[ -d "$PREP/site/bitsandbytes" ]]; then
  # The bitsandbytes baseline of the benchmarks (the GPU machine has no network).
  export PYTHONPATH="$PWD/$PREP/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
