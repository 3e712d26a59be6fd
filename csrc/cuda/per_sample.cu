// CUDA registration of per_sample_grad_sq_: the shared tiling (per_sample.cpp) forms each tile of
// per-sample gradients with one batched GEMM; this kernel squares and accumulates a tile.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "multi_tensor.cuh"
#include "per_sample.h"

namespace fisheradaptune {
namespace {

// 2^26 float32 = 256 MiB of per-sample gradients per tile: large enough that the GEMM of a tile
// fills an H100, small next to 80 GB. ViT-B's largest Linear (3072 x 768) gets 28 samples a tile.
constexpr int64_t kTileElems = int64_t(1) << 26;

// fisher[j] += scale * sum_k tile[k, j]^2, k in order: acc = fma(v, v, acc) per sample, then
// fisher = fma(acc, scale, fisher), each fma explicit (__fmaf_rn), so the rounding is fixed
// whatever nvcc's contraction settings. Each thread owns its elements across all samples, so the
// result does not depend on the launch shape: deterministic on a device.
// NOT bitwise the CPU's: the tiles come from another GEMM (cuBLAS here, the CPU BLAS there, with
// their own summation orders), and the CPU kernel, built with -ffp-contract=off, rounds the
// product and the sum separately where its vector unit has no fma. CPU and CUDA agree to float32
// rounding (tests compare both with a float64 reference). Both GEMMs run in full fp32 whatever
// the float32 matmul precision (Note [Full fp32 per-sample GEMM], per_sample.cpp).
template <bool kVec>
__global__ void __launch_bounds__(mt::kThreads)
    square_accumulate_kernel(float* __restrict__ fisher, const float* __restrict__ tile,
                             int64_t m, int64_t b, float scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * mt::kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * mt::kThreads + threadIdx.x;
  if constexpr (kVec) {
    // m % 4 == 0 and both pointers 16-byte aligned, so every row of the tile is too.
    const int64_t m4 = m / 4;
    float4* f4 = reinterpret_cast<float4*>(fisher);
    const float4* t4 = reinterpret_cast<const float4*>(tile);
    for (int64_t j = first; j < m4; j += stride) {
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
      for (int64_t k = 0; k < b; ++k) {
        const float4 v = t4[k * m4 + j];
        acc.x = __fmaf_rn(v.x, v.x, acc.x);
        acc.y = __fmaf_rn(v.y, v.y, acc.y);
        acc.z = __fmaf_rn(v.z, v.z, acc.z);
        acc.w = __fmaf_rn(v.w, v.w, acc.w);
      }
      float4 f = f4[j];
      f.x = __fmaf_rn(acc.x, scale, f.x);
      f.y = __fmaf_rn(acc.y, scale, f.y);
      f.z = __fmaf_rn(acc.z, scale, f.z);
      f.w = __fmaf_rn(acc.w, scale, f.w);
      f4[j] = f;
    }
  } else {
    for (int64_t j = first; j < m; j += stride) {
      float acc = 0.f;
#pragma unroll 4
      for (int64_t k = 0; k < b; ++k) {
        const float v = tile[k * m + j];
        acc = __fmaf_rn(v, v, acc);
      }
      fisher[j] = __fmaf_rn(acc, scale, fisher[j]);
    }
  }
}

void square_accumulate_cuda(const at::Tensor& fisher, const at::Tensor& tile, double scale) {
  const int64_t m = fisher.numel();
  const int64_t b = tile.size(0);
  if (m == 0 || b == 0) return;
  TORCH_INTERNAL_ASSERT(fisher.scalar_type() == at::kFloat && tile.scalar_type() == at::kFloat &&
                        fisher.is_contiguous() && tile.is_contiguous() && tile.numel() == b * m);
  const c10::cuda::CUDAGuard guard(fisher.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  float* f = fisher.data_ptr<float>();
  const float* t = tile.const_data_ptr<float>();
  const bool vec = m % 4 == 0 && reinterpret_cast<uintptr_t>(f) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(t) % 16 == 0;
  const int64_t units = vec ? m / 4 : m;
  const int64_t blocks = (units + mt::kThreads - 1) / mt::kThreads;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(blocks, mt::kMaxGrid));
  if (vec) {
    square_accumulate_kernel<true><<<grid, mt::kThreads, 0, stream>>>(f, t, m, b,
                                                                      static_cast<float>(scale));
  } else {
    square_accumulate_kernel<false><<<grid, mt::kThreads, 0, stream>>>(f, t, m, b,
                                                                       static_cast<float>(scale));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void per_sample_grad_sq_cuda(const at::Tensor& fisher, const at::Tensor& x,
                             const at::Tensor& grad_out, double scale) {
  // Validation comes first inside per_sample_grad_sq; the kernel sets its own device guard.
  per_sample_grad_sq(fisher, x, grad_out, scale, kTileElems, &square_accumulate_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(fisheradaptune, CUDA, m) {
  m.impl("per_sample_grad_sq_", &per_sample_grad_sq_cuda);
}

}  // namespace fisheradaptune
