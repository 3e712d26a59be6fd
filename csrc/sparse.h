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
// element per thread/warp: bitwise deterministic. T = 0 gives zeros. On CPU index values are
// checked; on CUDA that would need a synchronisation, so an out-of-range index yields NaN for
// that element (never an out-of-bounds read).
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
