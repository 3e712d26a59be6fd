#!/usr/bin/env bash
# The GPU checks in one prepared script, for a session lent a GPU machine (see README
# "Status"). Each phase appends to $OUT/gpu_check.log (or ./gpu_check.log) and stops the script
# on failure, so the log says how far it got:
#
#   bash tools/gpu_check.sh build      # build with the CUDA kernels (FORCE_CUDA=1), ~2 min
#   bash tools/gpu_check.sh test       # the whole suite, CUDA cases included
#   bash tools/gpu_check.sh sanitize   # compute-sanitizer memcheck + racecheck on the CUDA op tests
#   bash tools/gpu_check.sh bench      # every benchmark with --device cuda (results/*-cuda.*)
#   bash tools/gpu_check.sh all        # the four in order
#
# Uses only what the GPU image has (torch with CUDA, pytest, hypothesis, scipy, timm, ...);
# installs nothing from the network. Benchmark results land in benchmarks/results/ and, when
# $OUT is set, are copied there to be fetched and committed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
LOG="${OUT:-.}/gpu_check.log"
phase() { echo "=== $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }
run() { "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || { echo "FAILED ($rc): $*" | tee -a "$LOG"; exit "$rc"; }; }

build() {
  phase build
  run nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  run python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  FORCE_CUDA=1 MAX_JOBS="$(nproc)" run python3 -m pip install -q --no-build-isolation --no-deps -e .
  run python3 -c "import fisheradaptune as f; assert f.has_cuda_kernels(), 'no CUDA kernels'; print('CUDA kernels loaded')"
}

tests() {
  phase test
  run python3 -m pytest -q -x -p no:cacheprovider tests
}

sanitize() {
  phase sanitize
  local ops=(tests/ops)
  for tool in memcheck racecheck; do
    run compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
      python3 -m pytest -q -x -p no:cacheprovider -m cuda "${ops[@]}"
  done
}

bench() {
  phase bench
  run python3 benchmarks/bench_fisher.py --device cuda
  run python3 benchmarks/bench_adaptune.py --device cuda
  run python3 benchmarks/bench_tokens.py --device cuda
  run python3 benchmarks/bench_selection.py --device cuda
  if [ -n "${OUT:-}" ]; then cp benchmarks/results/*-cuda.* "$OUT"/ 2>/dev/null || true; fi
}

case "${1:-all}" in
  build) build ;;
  test) tests ;;
  sanitize) sanitize ;;
  bench) bench ;;
  all) build; tests; sanitize; bench ;;
  *) echo "usage: $0 [build|test|sanitize|bench|all]" >&2; exit 2 ;;
esac
phase done
