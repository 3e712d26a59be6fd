// sampled_grad (SDDMM) for TR-PTS compact training: argument validation shared by the CPU and
// CUDA kernels.
//
// Note [Sampled gradient]
// grad_out [T, out], x [T, in] (same dtype: float32, bfloat16, float16 or float64), index int64
// [out, C] with values in [0, in):
//   out[i, c] = sum_t grad_out[t, i] * x[t, index[i, c]]
// i.e. the entries of the Linear weight gradient grad_out^T x picked by a row-balanced index,
// without forming the dense [out, in] gradient. The result is float32 (float64 for float64
// inputs); products are accumulated in that type (at::opmath_type) in a fixed order, one output
// element per thread/warp: bitwise deterministic.
//
// One contract on both backends, checked by validate_sampled_grad before anything runs:
//   - every index value must lie in [0, in): a ValueError naming 'index' otherwise. So in == 0
//     admits only C == 0 (an index with no columns). Repeated columns within a row are allowed
//     (each is computed independently).
//   - T == 0 (no tokens) gives zeros [out, C]; out == 0 or C == 0 gives an empty result.
// On CUDA the range check reads the index's min and max back to the host (a synchronisation),
// once per index tensor and version (Note [Checked indices], sparse/sampled_grad_args.cpp): a
// static index (SparseLinear's) costs one synchronisation in all, not one per call. The op refuses
// CUDA-graph capture (Note [No CUDA-graph capture], cuda/multi_tensor.cuh).
#pragma once

#include <ATen/core/Tensor.h>

namespace fisheradaptune {

struct SampledGradArgs {
  at::Tensor grad_out;  // [T, out], as given (kernels transpose to [out, T])
  at::Tensor x;         // [T, in]
  at::Tensor index;     // contiguous int64 [out, C]
  int64_t tokens = 0, rows = 0, cols = 0, picks = 0;  // T, out, in, C
  at::ScalarType out_dtype = at::kFloat;
};

SampledGradArgs validate_sampled_grad(const at::Tensor& grad_out, const at::Tensor& x,
                                      const at::Tensor& index);

}  // namespace fisheradaptune
