#!/usr/bin/env bash
# The integration stage: the real ecosystem (torch 2.14.1 CUDA build running on the CPU,
# torchvision 0.29.1, timm, peft, transformers) in its own venv, with the CUDA kernels compiled
# AND linked against that torch (FORCE_CUDA=1) for sm_80 and sm_90, every op's CPU/CUDA/Meta
# kernels checked, every CUDA kernel's launch resources checked (tools/cuda_resources.py: registers,
# spills and shared memory within a block's limits, Note [Launch resources] in
# csrc/common/multi_tensor.cuh), and the whole suite run there (the CPU kernels serve the tests;
# CUDA cases skip without a GPU).
#
# It works on a copy of the tree so that its CUDA build never replaces the CPU build of the
# main stage (both would be fisheradaptune/_C.cpython-*.so). No model weights are downloaded.
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
pipi timm peft transformers numpy ninja pytest hypothesis scipy tqdm scikit-learn matplotlib
"$PY" -c "import torch, torchvision, timm, peft, transformers as t; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| torchvision', torchvision.__version__, \
'| timm', timm.__version__, '| peft', peft.__version__, '| transformers', t.__version__)"

step "copy of the tree in $WORK"
# Tracked and untracked-but-not-ignored files only: no build outputs of the main stage.
git ls-files -z --cached --others --exclude-standard | tar -C "$ROOT" --null -T - -cf - | tar -C "$WORK" -xf -

step "CUDA build, linked (FORCE_CUDA=1, sm_80 and sm_90)"
# No CUDA_HOME here: setup.py (tools/build_config.py) must find the toolkit itself, although
# the nvcc on PATH is a wrapper script, and print it in its build configuration.
# Both architectures the resource check below reads (A100 and H100/H200 limits).
(cd "$WORK" && FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0} \
   MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -v --no-build-isolation --no-deps -e . \
   >"$WORK/build.log" 2>&1 || { tail -60 "$WORK/build.log"; exit 1; })
grep -A8 "fisheradaptune build configuration" "$WORK/build.log"

step "kernels registered for every op"
(cd "$WORK" && "$PY" - <<'EOF'
import torch
import fisheradaptune as fat
ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fisheradaptune::")]
assert ops, "no fisheradaptune ops registered"
missing = [(op, key) for op in ops for key in ("CPU", "CUDA", "Meta")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)]
assert not missing, f"missing kernels: {missing}"
assert fat.has_cuda_kernels()
so = fat._C.__file__
print(f"{len(ops)} ops with CPU, CUDA and Meta kernels; {so}")
EOF
)
# Linked against a real CUDA runtime (torch's own libraries resolve through torch at import).
(cd "$WORK" && ldd fisheradaptune/_C*.so | grep -E "libcudart[^ ]* => /") ||
  { echo "fisheradaptune/_C is not linked against a CUDA runtime (libcudart)"; exit 1; }

step "CUDA launch resources (cuobjdump, sm_80 and sm_90)"
# Fails when a kernel could not launch for lack of registers or shared memory, has no
# __launch_bounds__, or spills without a comment saying why; prints every kernel's row.
(cd "$WORK" && "$PY" tools/cuda_resources.py --arch sm_80,sm_90)

step "tests on the real ecosystem"
set +e
(cd "$WORK" && "$PY" -m pytest -q -p no:cacheprovider tests)
rc=$?
set -e
if [ "$rc" -eq 5 ]; then rc=0; fi
step "done (rc=$rc)"
rm -rf "$WORK"
exit "$rc"
