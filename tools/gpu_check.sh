#!/usr/bin/env bash
# The GPU check, for a session lent the GPU machine (README "Status"; issue text: 15 minutes of
# device time per session, 10 minutes per command).
#
#   bash tools/gpu_check.sh quick            # one call, under 9 minutes: the evidence that matters
#   bash tools/gpu_check.sh quick --dry-run  # print the plan and its time budget; run nothing
#   bash tools/gpu_check.sh full-tests       # the whole suite with CUDA (one call, ~6 min)
#   bash tools/gpu_check.sh full-bench       # the full benchmarks (one call, ~8 min)
#   bash tools/gpu_check.sh quick --wheel .whl/fisheradaptune-0.1.0-cp310-abi3-linux_x86_64.whl
#       # any mode: install a wheel built here (carried in .whl/, git-ignored) instead of
#       # building on the GPU machine, saving the build's minutes of the lease. Built with
#       # FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" pip wheel --no-build-isolation
#       # --no-deps . -w .whl (the stable ABI lets a wheel built against torch 2.14 here load
#       # into the GPU machine's torch 2.11). Tests then run with `python -P`, on the wheel.
#
# `quick` runs its steps in order of importance, each under its own timeout and into its own
# file under $OUT (./gpu_check_out without $OUT), so a kill still returns what ran:
#   summary.txt     environment, then one line per step (status, seconds); read this first
#   build.log       FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 build, all cores, ninja
#   cuda_tests.xml  pytest -m cuda (every CUDA test, no -x) as JUnit XML; cuda_tests.log its output
#   memcheck.log    compute-sanitizer memcheck over tools/gpu_edge_cases.py (every op family)
#   racecheck.log   compute-sanitizer racecheck over the drift, token and bipartite cases
#   bench.json/.md  short benchmarks (--quick): fisher vs _foreach vs copy bandwidth, js_drift
#                   histogram on a ViT-B list, token prune-merge, ToMe merge, FisherAdapTune
#                   overhead
# Eight files, flat. A step whose tool is missing is recorded as skipped, not failed. Nothing is
# installed from the network. If the image has no ninja, a binary in tools/bin/ninja (carried by
# the device tool; git-ignored) is put on PATH.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
MODE=${1:-quick}
DRY=0
WHEEL=""
prev=""
for a in "$@"; do
  [ "$a" = "--dry-run" ] && DRY=1
  case "$a" in --wheel=*) WHEEL=${a#--wheel=} ;; esac
  [ "$prev" = "--wheel" ] && WHEEL=$a
  prev=$a
done
if [ -n "$WHEEL" ] && [ ! -f "$WHEEL" ]; then echo "gpu_check: --wheel $WHEEL: no such file" >&2; exit 2; fi
# With a wheel, the tree's own fisheradaptune/ (no compiled library) must not shadow the
# installed one: -P keeps the working directory off sys.path.
PYFLAGS=""
[ -n "$WHEEL" ] && PYFLAGS="-P"
OUTDIR=${OUT:-$ROOT/gpu_check_out}
SUMMARY=$OUTDIR/summary.txt

# name | timeout (s) | output files | what
QUICK_PLAN=(
  "env|20|summary.txt|nvidia-smi, nvcc, torch, ninja, compute-sanitizer"
  "build|200|build.log|FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 pip install -e . (ninja, all cores), or pip install --wheel's file"
  "cuda_tests|120|cuda_tests.xml cuda_tests.log|pytest -m cuda tests (junit, no -x)"
  "memcheck|60|memcheck.log|compute-sanitizer memcheck, tools/gpu_edge_cases.py (all families)"
  "racecheck|40|racecheck.log|compute-sanitizer racecheck, tools/gpu_edge_cases.py --only drift,tokens,bipartite"
  "bench|100|bench.json bench.md|bench_fisher (ViT-B), bench_tokens --quick, bench_tome --quick, bench_adaptune (ViT-B, few steps)"
)
BUDGET_S=540   # 9 minutes

plan() {
  local total=0 files=0
  echo "gpu_check.sh $MODE: plan (outputs in $OUTDIR)"
  printf '  %-11s %7s  %-30s %s\n' step timeout files what
  for row in "${QUICK_PLAN[@]}"; do
    IFS='|' read -r name t out what <<<"$row"
    printf '  %-11s %6ss  %-30s %s\n' "$name" "$t" "$out" "$what"
    total=$((total + t)); files=$((files + $(wc -w <<<"$out")))
  done
  # summary.txt is listed once (env writes it, every step appends to it)
  echo "  total timeout ${total} s of a ${BUDGET_S} s budget; ${files} files (at most 8)"
  local ok=0 f
  for f in tools/gpu_edge_cases.py tools/collect_bench.py benchmarks/bench_fisher.py \
      benchmarks/bench_tokens.py benchmarks/bench_tome.py benchmarks/bench_adaptune.py; do
    [ -f "$f" ] || { echo "  missing: $f"; ok=1; }
  done
  # What the cuda_tests step would run (collection only, no GPU needed).
  echo "  cuda_tests selects: $("$PY" -m pytest --co -q -m cuda -p no:cacheprovider tests 2>&1 | tail -1)"
  [ "$total" -le "$BUDGET_S" ] && [ "$files" -le 8 ] && [ "$ok" -eq 0 ]
}

timeout_of() {
  for row in "${QUICK_PLAN[@]}"; do
    IFS='|' read -r name t _ _ <<<"$row"
    [ "$name" = "$1" ] && { echo "$t"; return; }
  done
  echo 60
}

# step NAME CMD...: runs CMD under the step's timeout, appends "NAME status seconds" to summary.
step() {
  local name=$1; shift
  local t; t=$(timeout_of "$name")
  local t0=$SECONDS rc
  timeout --kill-after=5 "$t" bash -c '"$@"' _ "$@"; rc=$?
  local status=ok
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="TIMEOUT after ${t}s"
  [ "$rc" -ne 0 ] && [ "$status" = ok ] && status="FAILED rc=$rc"
  printf '%-11s %-22s %4d s\n' "$name" "$status" $((SECONDS - t0)) >>"$SUMMARY"
  return "$rc"
}

env_step() {
  {
    echo "# gpu_check $MODE  $(date -u +%FT%TZ)  commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    timeout 15 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 | head -3
    (nvcc --version 2>&1 || echo "nvcc: missing") | tail -1
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())" 2>&1
    echo "ninja: $(command -v ninja || echo missing)  compute-sanitizer: $(command -v compute-sanitizer || echo missing)  cores: $(nproc)"
    echo "# steps"
  } >"$SUMMARY"
}

build_step() {
  if [ -n "$WHEEL" ]; then
    "$PY" -m pip install -v --no-deps --force-reinstall "$WHEEL" >"$OUTDIR/build.log" 2>&1 || return 1
  else
    if ! command -v ninja >/dev/null && [ -x tools/bin/ninja ]; then export PATH=$ROOT/tools/bin:$PATH; fi
    FORCE_CUDA=1 FISHERADAPTUNE_BUILD_REQUIRED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
      MAX_JOBS=$(nproc) "$PY" -m pip install -v --no-build-isolation --no-deps -e . \
      >"$OUTDIR/build.log" 2>&1 || return 1
  fi
  "$PY" $PYFLAGS -c "import fisheradaptune as f; assert f.has_cuda_kernels(), f._loader.cuda_fallback_reason(); print('CUDA kernels loaded from', f.__file__)" \
    >>"$OUTDIR/build.log" 2>&1
}

tests_step() {
  "$PY" $PYFLAGS -m pytest -q -m cuda -p no:cacheprovider -rfE --junitxml="$OUTDIR/cuda_tests.xml" tests \
    >"$OUTDIR/cuda_tests.log" 2>&1
}

sanitizer() {  # sanitizer TOOL LOG [edge-case args]
  local tool=$1 log=$2; shift 2
  if ! command -v compute-sanitizer >/dev/null; then echo "compute-sanitizer missing" >"$log"; return 0; fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 3 \
    --print-limit 50 "$PY" tools/gpu_edge_cases.py --device cuda "$@" >"$log" 2>&1
}

bench_step() {
  local dir=$OUTDIR/bench_parts
  mkdir -p "$dir"
  # Each under its own share of the step's timeout, so one slow benchmark leaves the others.
  timeout 33 "$PY" benchmarks/bench_fisher.py --device cuda --models vit_b --iters 30 \
    --max-seconds 2 >"$dir/fisher.txt" 2>&1
  timeout 18 "$PY" benchmarks/bench_tokens.py --device cuda --quick >"$dir/tokens.txt" 2>&1
  timeout 15 "$PY" benchmarks/bench_tome.py --device cuda --quick >"$dir/tome.txt" 2>&1
  timeout 28 "$PY" benchmarks/bench_adaptune.py --device cuda --model vit_b --iters 10 \
    >"$dir/adaptune.txt" 2>&1
  "$PY" tools/collect_bench.py --out "$OUTDIR/bench" --logs "$dir" \
    benchmarks/results/bench_fisher-cuda.json benchmarks/results/bench_tokens-quick-cuda.json \
    benchmarks/results/bench_tome-quick-cuda.json benchmarks/results/bench_adaptune-cuda.json
  rm -rf "$dir"
}

export -f build_step tests_step sanitizer bench_step
export ROOT PY PYFLAGS OUTDIR SUMMARY WHEEL

quick() {
  env_step
  printf '%-11s %-22s %4d s\n' env ok "$SECONDS" >>"$SUMMARY"
  step build build_step || { echo "build failed: see build.log" >>"$SUMMARY"; return 1; }
  step cuda_tests tests_step
  step memcheck sanitizer memcheck "$OUTDIR/memcheck.log"
  step racecheck sanitizer racecheck "$OUTDIR/racecheck.log" --only drift,tokens,bipartite
  step bench bench_step
  echo "# done in $SECONDS s" >>"$SUMMARY"
}

[ "$DRY" -eq 1 ] || mkdir -p "$OUTDIR"
case "$MODE" in
  quick)
    if [ "$DRY" -eq 1 ]; then plan; exit $?; fi
    quick ;;
  full-tests)
    [ "$DRY" -eq 1 ] && { echo "full-tests: build (~3 min) + the whole suite with CUDA, ~6 min"; exit 0; }
    env_step; step build build_step &&
      "$PY" -m pytest -q -p no:cacheprovider -rfE --junitxml="$OUTDIR/all_tests.xml" tests \
        >"$OUTDIR/all_tests.log" 2>&1 ;;
  full-bench)
    [ "$DRY" -eq 1 ] && { echo "full-bench: build + every benchmark at full size, ~8 min"; exit 0; }
    env_step; step build build_step || exit 1
    mkdir -p "$OUTDIR/bench_parts"
    for b in fisher tokens adaptune selection compile; do
      "$PY" benchmarks/bench_$b.py --device cuda >"$OUTDIR/bench_parts/$b.txt" 2>&1 || echo "bench_$b failed" >>"$SUMMARY"
    done
    "$PY" tools/collect_bench.py --out "$OUTDIR/bench_full" --logs "$OUTDIR/bench_parts" \
      benchmarks/results/bench_{fisher,tokens,adaptune,selection,compile}-cuda.json
    rm -rf "$OUTDIR/bench_parts" ;;
  *) echo "usage: $0 quick|full-tests|full-bench [--dry-run]" >&2; exit 2 ;;
esac
