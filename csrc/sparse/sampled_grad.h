// sampled_grad (SDDMM) for TR-PTS compact training: argument validation shared by the CPU and
// CUDA kernels.
//
// Note [Sampled gradient]
// grad_out [T, out], x [T, in] (same dtype: float32, bfloat16, float16 or float64), index int64
// [out, C] with values in [0, in):
//   out[i, c] = sum_t grad_out[t, i] * x[t, index[i, c]]
// i.e. the entries of the Linear weight gradient grad_out^T x picked by a row-balanced index,
// without forming the dense [out, in] gradient. The result is float32 (float64 for float64
// inputs); products are accumulated in that type (opmath_t) in a fixed order, one output
// element per thread/warp: bitwise deterministic.
//
// One contract on both backends, checked by validate_sampled_grad before anything runs:
//   - every index value must lie in [0, in): a ValueError naming 'index' otherwise. So in == 0
//     admits only C == 0 (an index with no columns). Repeated columns within a row are allowed
//     (each is computed independently).
//   - T == 0 (no tokens) gives zeros [out, C]; out == 0 or C == 0 gives an empty result.
// On CUDA the range check reads the index's min and max back to the host (a synchronisation).
// A caller that has already checked this index passes index_checked = true and the check, with
// its synchronisation, is skipped (Note [Checked indices], sparse/sampled_grad_args.cpp): the
// typed wrapper does so for an index it has seen unchanged, so a static index (SparseLinear's)
// costs one synchronisation in all, not one per call. The op refuses CUDA-graph capture (Note
// [No CUDA-graph capture], common/multi_tensor.cuh).
#pragma once

#include "common/stable.h"

#include <torch/headeronly/macros/Export.h>

#include <cstdint>

namespace fisheradaptune {

// Hidden like torch::stable::Tensor (declared in a hidden namespace), whose handles it holds:
// an internal type of this library, never exported.
struct C10_HIDDEN SampledGradArgs {
  Tensor grad_out;  // [T, out], as given (kernels transpose to [out, T])
  Tensor x;         // [T, in]
  Tensor index;     // contiguous int64 [out, C]
  int64_t tokens = 0, rows = 0, cols = 0, picks = 0;  // T, out, in, C
  ScalarType out_dtype = ScalarType::Float;
};

// Checks every argument (the index's values only when !index_checked) and returns them as the
// kernels read them.
C10_HIDDEN SampledGradArgs validate_sampled_grad(const Tensor& grad_out, const Tensor& x, const Tensor& index,
                                      bool index_checked);

}  // namespace fisheradaptune
