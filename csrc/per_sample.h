// per_sample_grad_sq_: the device-independent part (tiling over samples, one batched GEMM per
// tile); each backend supplies the fused square-and-accumulate of a tile.
#pragma once

#include <ATen/core/Tensor.h>

namespace fisheradaptune {

// fisher[j] += scale * sum_b tile[b, j]^2 for a contiguous tile [b, out, in] of the fisher's
// dtype, summing b in order (deterministic).
using SquareAccumulateFn = void (*)(const at::Tensor& fisher, const at::Tensor& tile,
                                    double scale);

// Validates, then walks the samples in tiles of at most `tile_elems` per-sample-gradient
// elements (at least one sample per tile), so per-sample gradients never exist beyond a tile.
void per_sample_grad_sq(const at::Tensor& fisher, const at::Tensor& x, const at::Tensor& grad_out,
                        double scale, int64_t tile_elems, SquareAccumulateFn square_accumulate);

}  // namespace fisheradaptune
