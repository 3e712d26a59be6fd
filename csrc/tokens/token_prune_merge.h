// token_prune_merge and its backward: argument validation shared by the CPU and CUDA kernels.
//
// Note [Token prune-merge]
// x [B, N, C]; the first P = num_protected tokens of each row are protected; the other
// M = N - P are candidates, scored by scores [B, M]. Per row:
//   - selection: the `keep` candidates with the highest score, ties to the lower index, NaN
//     above every number (torch.sort's order). Deterministic, also under ties.
//   - out rows: the P protected tokens, then the kept tokens in their original order, then, when
//     keep < M, one fused token of the M - keep others ("merged"), in index order:
//       w_i = scores_i * sizes_{P+i},  W = sum_merged w_i,
//       fused = sum_merged (w_i / W) x_i   (normalize; a zero token when W == 0, with zero
//                                           gradients: Note [Zero coefficients])
//       fused = sum_merged w_i x_i         (not normalize; EViT's)
//   - out_sizes: the protected and kept tokens' sizes, then sum_merged sizes_{P+i}.
// Sizes are float32 (default: ones) and out_sizes is float32 whatever x's dtype: sizes count
// tokens and need no gradient. scores are x's dtype or float32. The weights, W and the
// coefficients are float64 (Note [Merge weights]); the rows accumulate in float32 for
// float32/bfloat16/float16 inputs and in float64 for float64 (opmath_t, common/stable.h).
//
// Backward, with g the gradient of the fused row (coef_i = w_i / W or w_i):
//   dx: protected and kept tokens get their out row's gradient; merged tokens coef_i * g.
//   dscores_i (merged): size_i * (x_i . g - fused . g) / W (normalize; 0 when W == 0),
//                       size_i * x_i . g (not normalize), with fused . g = sum_j coef_j x_j . g;
//   dscores (kept): 0, the selection being piecewise constant in the scores.
// Token indices are int32 in both kernels: N < 2^31 (checked by the shared validation).
//
// Note [Zero coefficients]
// A merged token whose coefficient is exactly 0 adds nothing to the fused token, whatever its
// values: its inf/NaN values are read as 0, so 0 * x_i is 0 for every x_i (IEEE would give NaN
// for 0 * inf). This is what makes "a zero token when W == 0" hold under normalize, where every
// coefficient is then 0: a padding or masked token that weighs nothing (score or size 0) cannot
// turn the fused token into NaN. Under normalize=False, a fused row whose weights are all 0 is
// likewise zeros (a zero W from weights that cancel, e.g. +1 and -1, is not special there: the
// row is the plain sum). The gradients are those of that function:
//   - dx_i = coef_i * g = 0;
//   - the dot x_i . g of a zero-coefficient token runs over its finite values only, and
//     fused . g skips zero coefficients like the forward, so one bad token with no weight
//     leaves every score gradient finite;
//   - under normalize with W == 0 every dscores_i is 0 (the row is constant zeros).
// For finite tokens nothing changes (adding 0 * x_i was a no-op, and the dots are the same
// sums in the same order). The reference (fisheradaptune.reference.token_prune_merge) computes
// the same function, with masks that keep its autograd gradients free of 0 * inf.
// "Exactly 0" is the float64 coefficient's (Note [Merge weights]): only a zero score or size, or
// W == 0 under normalize, makes a token weigh nothing.
//
// Note [Merge weights]
// Both token ops (and bipartite_merge, Note [Bipartite merge]) compute the weights, their total
// W and the coefficients in float64, whatever x's dtype, as the reference does: the product of
// two float32 values and a sum of up to 2^31 of them can neither underflow nor overflow there,
// so a token whose score and size are nonzero always has a nonzero coefficient. In float32 they
// could: scores 1e-30 and size 1e-20 gave w = 0 (the token silently dropped), and sizes
// [1e-45, 3e38] gave a coefficient 1e-45 / 3e38 that is 0 in float32, hiding an inf or NaN token
// (the merged row read 1.0 where float64 and the reference give inf). The rows then accumulate
// in the opmath type A: a coefficient that is a finite nonzero A value is applied in A (the fast
// path); one that rounds to 0 or overflows in A has its products c * x_i formed in float64 and
// rounded to A, so a token that weighs something propagates its inf/NaN values (inf * 3e-84 =
// inf) and its finite ones round as they should. The gradients use the same coefficients
// (dx_i = c_i * g the same way; the score gradient's W, fused . g and the quotient in float64).
// Only a coefficient of exactly 0 in float64 means "adds nothing" (Note [Zero coefficients]).
#pragma once

#include "common/stable.h"

#include <optional>

namespace fisheradaptune {

// Hidden like the st::Tensor handles it holds (torch::stable is a hidden namespace): library-
// internal, and a default-visibility struct with hidden fields draws -Wattributes.
struct __attribute__((visibility("hidden"))) TokenPruneMergeArgs {
  Tensor x;       // contiguous [B, N, C]
  Tensor scores;  // contiguous [B, M]
  Tensor sizes;   // contiguous float32 [B, N], or undefined (all ones)
  int64_t batch = 0, tokens = 0, channels = 0;
  int64_t protect = 0;  // P
  int64_t cand = 0;     // M = N - P
  int64_t keep = 0;
  bool fused = false;   // keep < M: the out rows end with a fused token
  int64_t rows() const { return protect + keep + (fused ? 1 : 0); }
};

TokenPruneMergeArgs validate_token_prune_merge(const Tensor& x, const Tensor& scores,
                                               const std::optional<Tensor>& sizes,
                                               int64_t num_protected, int64_t keep);

// Also returns kept_index (contiguous) and grad_out (contiguous) in `kept` and `grad`. On CPU
// kept_index's values are checked (strictly increasing, in [0, M)); on CUDA that would need a
// synchronisation, so the kernels only guard against out-of-range values (never reading or
// writing outside the tensors) and kept_index must come from the forward.
TokenPruneMergeArgs validate_token_prune_merge_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& scores,
    const std::optional<Tensor>& sizes, const Tensor& kept_index, int64_t num_protected,
    Tensor& kept, Tensor& grad);

}  // namespace fisheradaptune
