#!/usr/bin/env bash
# make sanitize / make sanitize-ci: build the extension CPU-only with AddressSanitizer and
# UndefinedBehaviorSanitizer, float-to-int overflow included (GCC's -fsanitize=undefined leaves
# it out; Note [Sanitizer build] in CMakeLists.txt) into build/sanitize,
# beside .venv's normal install, then run pytest with the given arguments under it once per
# CPU ISA this machine has: avx512, then avx2, then scalar (QLORA_EXT_CPU_ISA).
#   scripts/sanitize.sh build            only the build
#   scripts/sanitize.sh tests/test_x.py  build, then the tests on every ISA
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
SAN=build/sanitize
SITE=$SAN/site
SANITIZERS=address,undefined,float-cast-overflow

start=$(date +%s)
# --target: a folder of its own that PYTHONPATH puts ahead of .venv's site-packages; the
# CMake tree stays in $SAN/cmake, so a rebuild is incremental.
QLORA_EXT_CUDA=0 $BIN/pip install --no-build-isolation --no-deps --quiet --upgrade \
  --target "$SITE" -C build-dir="$SAN/cmake" -C cmake.build-type=RelWithDebInfo \
  -C cmake.define.QLORA_EXT_SANITIZE="$SANITIZERS" .
echo "sanitizer build: $(($(date +%s) - start)) s"
[ "${1:-}" = build ] && exit 0

# Python and torch are not instrumented, so the ASan runtime must be the first library loaded.
CXX=${CXX:-c++}
export LD_PRELOAD="$($CXX -print-file-name=libasan.so) $($CXX -print-file-name=libubsan.so)"
export PYTHONPATH="$PWD/$SITE"
# detect_leaks=0: CPython and torch keep interned objects, caches and registries alive until
# exit by design, so LeakSanitizer reports thousands of leaks that are not ours, and real ones
# would drown in them. Any other report ends the process with an error (halt_on_error), and so
# fails the run. The build is CPU-only, so no GPU is needed: CUDA_VISIBLE_DEVICES hides any,
# and protect_shadow_gap=0 lets the CUDA driver map memory where ASan's shadow gap lies, should
# it initialise anyway (torch.cuda.is_available() on a GPU machine).
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:protect_shadow_gap=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export CUDA_VISIBLE_DEVICES=

$BIN/python - "$SITE" "$SANITIZERS" <<'PY'
import os, sys
import torch  # noqa: F401
import qlora_ext
site, want = os.path.realpath(sys.argv[1]), sys.argv[2]
info = qlora_ext.build_info()
assert os.path.realpath(qlora_ext.__file__).startswith(site), qlora_ext.__file__
assert info["sanitize"] == want and not info["cuda"], info
print("sanitized build loaded:", qlora_ext.__file__, info)
PY

best=$($BIN/python -c "import torch, qlora_ext; print(qlora_ext.build_info()['cpu_isa_detected'])")
for isa in avx512 avx2 scalar; do
  case "$best:$isa" in
    scalar:avx2 | scalar:avx512 | avx2:avx512)
      echo "== $isa: this CPU lacks it, skipped"
      continue
      ;;
  esac
  t=$(date +%s)
  echo "== $isa"
  # --capture=sys: a report is written to file descriptor 2 by the runtime, which then ends the
  # process; under pytest's default fd capture it would go to a temporary file, never shown.
  QLORA_EXT_CPU_ISA=$isa $BIN/python -m pytest -q -p no:cacheprovider --capture=sys "$@"
  echo "== $isa: $(($(date +%s) - t)) s"
done
echo "sanitizer run: $(($(date +%s) - start)) s"
