// CUDA registration of per_sample_grad_sq_: the shared tiling (fisher/per_sample_grad_sq.cpp) forms
// each tile of per-sample gradients with one batched GEMM; this kernel squares and accumulates a
// tile.
#include "common/stable.h"

#include <algorithm>
#include <cfloat>

#include "common/multi_tensor.cuh"
#include "fisher/per_sample_grad_sq.h"

namespace fisheradaptune {
namespace {

// 2^26 float32 = 256 MiB of per-sample gradients per tile: large enough that the GEMM of a tile
// fills an H100, small next to 80 GB. ViT-B's largest Linear (3072 x 768) gets 28 samples a tile.
constexpr int64_t kTileElems = int64_t(1) << 26;

// One tile's step (fisher/per_sample_grad_sq.h): r = carry (or 0) + sum_k tile[k, j]^2, k in order,
// as r = fma(v, v, r) per sample, then either the Fisher update u = fma(r, scale, fisher) kept only
// where finite (Note [Skipping in per_sample_grad_sq_], fisher/per_sample_grad_sq.cpp), or r back
// into carry. Each fma is explicit (__fmaf_rn), so the rounding is fixed whatever nvcc's
// contraction settings; r continues the same fma chain across tiles, so the result is that of a
// single tile. Each thread owns its elements across all samples, so the result does not depend on
// the launch shape: deterministic on a device. The count is an integer block sum, then one
// atomicAdd per block: exact in any order.
// NOT bitwise the CPU's: the tiles come from another GEMM (cuBLAS here, the CPU BLAS there, with
// their own summation orders), and the CPU kernel, built with -ffp-contract=off, rounds the
// product and the sum separately. CPU and CUDA agree to float32 rounding (tests compare both
// with a float64 reference), and on which elements are skipped wherever an input is NaN or Inf.
// Both GEMMs run in full fp32 when called through the typed wrapper, whatever the caller's
// float32 matmul precision (Note [Full fp32 per-sample GEMM], fisher/per_sample_grad_sq.cpp).
__device__ __forceinline__ void finish(float& f, float r, float scale, unsigned& bad) {
  const float updated = __fmaf_rn(r, scale, f);
  const bool ok = fabsf(updated) <= FLT_MAX;  // false for NaN too
  f = ok ? updated : f;
  bad += ok ? 0u : 1u;
}

template <bool kVec>
__global__ void __launch_bounds__(mt::kThreads)
    square_accumulate_kernel(float* __restrict__ fisher, const float* __restrict__ tile,
                             float* __restrict__ carry, int64_t m, int64_t b, float scale,
                             bool first, bool last, unsigned long long* __restrict__ nonfinite) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * mt::kThreads;
  const int64_t first_j = static_cast<int64_t>(blockIdx.x) * mt::kThreads + threadIdx.x;
  unsigned bad = 0;
  if constexpr (kVec) {
    // m % 4 == 0 and every pointer 16-byte aligned, so every row of the tile is too.
    const int64_t m4 = m / 4;
    float4* f4 = reinterpret_cast<float4*>(fisher);
    float4* c4 = reinterpret_cast<float4*>(carry);
    const float4* t4 = reinterpret_cast<const float4*>(tile);
    for (int64_t j = first_j; j < m4; j += stride) {
      float4 acc = first ? make_float4(0.f, 0.f, 0.f, 0.f) : c4[j];
#pragma unroll 4
      for (int64_t k = 0; k < b; ++k) {
        const float4 v = t4[k * m4 + j];
        acc.x = __fmaf_rn(v.x, v.x, acc.x);
        acc.y = __fmaf_rn(v.y, v.y, acc.y);
        acc.z = __fmaf_rn(v.z, v.z, acc.z);
        acc.w = __fmaf_rn(v.w, v.w, acc.w);
      }
      if (!last) {
        c4[j] = acc;
        continue;
      }
      float4 f = f4[j];
      finish(f.x, acc.x, scale, bad);
      finish(f.y, acc.y, scale, bad);
      finish(f.z, acc.z, scale, bad);
      finish(f.w, acc.w, scale, bad);
      f4[j] = f;
    }
  } else {
    for (int64_t j = first_j; j < m; j += stride) {
      float acc = first ? 0.f : carry[j];
#pragma unroll 4
      for (int64_t k = 0; k < b; ++k) {
        const float v = tile[k * m + j];
        acc = __fmaf_rn(v, v, acc);
      }
      if (!last) {
        carry[j] = acc;
        continue;
      }
      float f = fisher[j];
      finish(f, acc, scale, bad);
      fisher[j] = f;
    }
  }
  if (!last) return;  // uniform over the grid
  bad = mt::block_sum(bad);  // every thread of the block gets here
  if (threadIdx.x == 0 && bad != 0) atomicAdd(nonfinite, static_cast<unsigned long long>(bad));
}

void square_accumulate_cuda(const Tensor& fisher, const Tensor& tile, double scale,
                            const Tensor& carry, bool first, bool last, const Tensor& nonfinite) {
  const int64_t m = fisher.numel();
  const int64_t b = tile.size(0);
  if (m == 0 || b == 0) return;
  FAT_INTERNAL_ASSERT(fisher.scalar_type() == ScalarType::Float &&
                      tile.scalar_type() == ScalarType::Float && fisher.is_contiguous() &&
                      tile.is_contiguous() && tile.numel() == b * m);
  FAT_INTERNAL_ASSERT((first && last) ||
                      (carry.defined() && carry.scalar_type() == ScalarType::Float &&
                       carry.is_contiguous() && carry.numel() == m));
  const mt::TensorDeviceGuard guard(fisher);
  const cudaStream_t stream = mt::current_stream(fisher.get_device_index());
  float* f = fisher.mutable_data_ptr<float>();
  const float* t = tile.const_data_ptr<float>();
  float* c = carry.defined() ? carry.mutable_data_ptr<float>() : nullptr;
  auto* counter = reinterpret_cast<unsigned long long*>(nonfinite.mutable_data_ptr<int64_t>());
  const bool vec = m % 4 == 0 && reinterpret_cast<uintptr_t>(f) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(t) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(c) % 16 == 0;  // null is aligned
  const int64_t units = vec ? m / 4 : m;
  const int64_t blocks = (units + mt::kThreads - 1) / mt::kThreads;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(blocks, mt::kMaxGrid));
  const float s = static_cast<float>(scale);  // in float32's range (Note [Coefficients])
  if (vec) {
    square_accumulate_kernel<true><<<grid, mt::kThreads, 0, stream>>>(f, t, c, m, b, s, first,
                                                                      last, counter);
  } else {
    square_accumulate_kernel<false><<<grid, mt::kThreads, 0, stream>>>(f, t, c, m, b, s, first,
                                                                       last, counter);
  }
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

void per_sample_grad_sq_cuda(const Tensor& fisher, const Tensor& x, const Tensor& grad_out,
                             double scale, const Tensor& nonfinite) {
  // Validation comes first inside per_sample_grad_sq; the kernel sets its own device guard.
  per_sample_grad_sq(fisher, x, grad_out, scale, nonfinite, kTileElems, &square_accumulate_cuda);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fisheradaptune, CUDA, m) {
  m.impl("per_sample_grad_sq_", TORCH_BOX(&per_sample_grad_sq_cuda));
}

}  // namespace fisheradaptune
