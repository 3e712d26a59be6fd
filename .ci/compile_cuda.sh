#!/usr/bin/env bash
# Compile every csrc/**/*.cu to an object file (no link) with the local nvcc against the
# installed torch's headers, so a CUDA compile error fails CI on a machine without a GPU.
# The CPU torch wheel lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h); the
# shim in .ci/cuda_shim provides it. Skips (exit 0) when no nvcc is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then echo "compile_cuda: no nvcc, skipped"; exit 0; fi
shopt -s nullglob globstar
sources=(csrc/**/*.cu)
if [ ${#sources[@]} -eq 0 ]; then echo "compile_cuda: no CUDA sources"; exit 0; fi
TI=$(python3 -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
ABI=$(python3 -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
ARCH=${CUDA_ARCH:-90}
mkdir -p .ci/build
pids=()
for src in "${sources[@]}"; do
  obj=.ci/build/$(basename "${src%.cu}").o  # basenames are unique (<op>_cuda.cu)
  "$NVCC" -c "$src" -o "$obj" -std=c++20 -O3 --expt-relaxed-constexpr \
    -gencode "arch=compute_${ARCH},code=sm_${ARCH}" -Xcompiler -fPIC \
    -D_GLIBCXX_USE_CXX11_ABI="$ABI" -DFISHERADAPTUNE_WITH_CUDA -DUSE_CUDA \
    -I.ci/cuda_shim -Icsrc -I"$TI" -I"$TI/torch/csrc/api/include" -w &
  pids+=($!)
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
if [ "$fail" -ne 0 ]; then echo "compile_cuda: FAILED"; exit 1; fi
echo "compile_cuda: ${#sources[@]} CUDA sources compiled with $("$NVCC" --version | tail -1)"
