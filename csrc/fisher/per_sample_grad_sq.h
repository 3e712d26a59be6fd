// per_sample_grad_sq_: the device-independent part (per_sample_grad_sq.cpp: tiling over
// samples, one batched GEMM per tile) and the argument validation (per_sample_grad_sq_args.cpp);
// each backend supplies the fused square-and-accumulate of a tile (per_sample_grad_sq_cpu.cpp,
// per_sample_grad_sq_cuda.cu).
#pragma once

#include "common/stable.h"

namespace fisheradaptune {

// One tile's part of the per-element sum r[j] = sum_n g_n[j]^2 (Note [Skipping in
// per_sample_grad_sq_], per_sample_grad_sq.cpp). For a contiguous tile [b, out, in] of the fisher's
// dtype, summing b in order (deterministic):
//   r[j] = (first ? 0 : carry[j]) + sum_b tile[b, j]^2;
//   last:     u = fisher[j] + scale * r[j]; fisher[j] = u where u is finite, else fisher[j]
//             is kept and the element counted: the backend adds its count to nonfinite
//             (int64, one element, zeroed by the caller);
//   not last: carry[j] = r[j] (fisher untouched).
// carry is a contiguous tensor like fisher, undefined when first && last.
using SquareAccumulateFn = void (*)(const Tensor& fisher, const Tensor& tile, double scale,
                                    const Tensor& carry, bool first, bool last,
                                    const Tensor& nonfinite);

// nonfinite: int64, one element, on fisher's device (Note [Skipping in per_sample_grad_sq_],
// per_sample_grad_sq.cpp).
void validate_per_sample_grad_sq(const Tensor& fisher, const Tensor& x, const Tensor& grad_out,
                                 double scale, const Tensor& nonfinite);

// Validates, then walks the samples in tiles of at most `tile_elems` per-sample-gradient
// elements (at least one sample per tile), so per-sample gradients never exist beyond a tile.
// Writes the number of skipped elements into nonfinite.
void per_sample_grad_sq(const Tensor& fisher, const Tensor& x, const Tensor& grad_out,
                        double scale, const Tensor& nonfinite, int64_t tile_elems,
                        SquareAccumulateFn square_accumulate);

}  // namespace fisheradaptune
