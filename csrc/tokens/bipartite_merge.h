// bipartite_merge (ToMe) and its backward: argument validation shared by the CPU and CUDA
// kernels.
//
// Note [Bipartite merge]
// x [B, N, C], metric [B, N, D]; the first P = num_protected tokens of each row never merge.
// ToMe's partition, over ALL N tokens by position: set A = the even positions 0, 2, 4, ...,
// set B = the odd positions 1, 3, 5, ... A protected token in A is never a source, one in B is
// never a destination (with P = 1 the class token at 0 is in A; with P = 2 the distillation
// token at 1 is in B). So the sources are A' = the even positions >= P, from a0 = P + (P & 1),
// and the destinations B' = the odd positions >= P, from b0 = P + 1 - (P & 1); of the
// M = N - P non-protected tokens, |A'| = ceil(M / 2) and |B'| = floor(M / 2) for P even, the
// other way round for P odd. (Before issue 23 the op split the M non-protected tokens
// alternately from P, which for odd P swapped the roles of the two sets: not ToMe's choice.)
// Per row:
//   - similarity: cosine on metric, sim(a, b) = n_a . n_b with n_i = metric_i / |metric_i|
//     (n_i = 0 when |metric_i| == 0; NaN/inf metrics give NaN similarities), accumulated in
//     the opmath type of metric's dtype (float32, or float64 for float64).
//   - matching: each A' token picks its most similar B' token (ties to the lower B' index);
//     the r A' tokens with the highest best similarity (ties to the lower A' index) merge into
//     their B' token. NaN ranks above every number in both choices (torch.sort's order), so
//     the choice is a total order and deterministic. 0 <= r <= (N - P) // 2 = min(|A'|, |B'|)
//     (ToMe's bound, docs/methods.md section 7: at most half of the non-protected tokens; an
//     r up to |A'| would be well defined for P even and M odd, but leaves no A' token).
//   - out rows: the P protected tokens in their original order, the A' tokens that did not
//     merge in their original order, then the B' tokens in their original order: N - r rows.
//     dest_index [B, N] int64 is the out row of every input token.
//   - an out row whose sources (the tokens i with dest_index[i] == row) are one token is that
//     token, copied bitwise. A row of several sources is their size-weighted mean: with
//     W = sum_sources s_i (summed in float64 in increasing token order),
//       out = sum_sources (s_i / W) x_i, in increasing token order,
//     and a zero row when W == 0; a source whose coefficient s_i / W is exactly 0 (in float64:
//     a zero size) adds nothing, its inf/NaN values read as 0 (Note [Zero coefficients],
//     csrc/tokens/token_prune_merge.h); any other source takes part with its inf/NaN values,
//     also when its coefficient underflows in the accumulation type (Note [Merge weights],
//     csrc/tokens/token_prune_merge.h).
//   - out_sizes [B, N - r] float32: W for every row (s_i for a copied row).
// Sizes are float32 (default: ones) and need no gradient. Accumulation is in float32 for
// float32/bfloat16/float16 x and in float64 for float64 (opmath_t, common/stable.h).
//
// Backward: the matching is a discrete choice and gets no gradient (metric has none). x's
// gradient is grad_x[i] = g[dest_index[i]] for a copied row's source, (s_i / W) g[dest_index[i]]
// otherwise, with W and the source counts recomputed from sizes and dest_index in the forward's
// order: the backward needs neither x nor metric.
// Token indices are int32 in both kernels: N < 2^31 (checked by the shared validation).
#pragma once

#include "common/stable.h"

#include <optional>

namespace fisheradaptune {

// Hidden like the st::Tensor handles it holds (as TokenPruneMergeArgs, token_prune_merge.h).
struct __attribute__((visibility("hidden"))) BipartiteMergeArgs {
  Tensor x;       // contiguous [B, N, C] (forward)
  Tensor metric;  // contiguous [B, N, D] (forward)
  Tensor grad;    // contiguous [B, N - r, C] (backward)
  Tensor dest;    // contiguous int64 [B, N] (backward)
  Tensor sizes;   // contiguous float32 [B, N], or undefined (all ones)
  int64_t batch = 0, tokens = 0, channels = 0, dims = 0;
  int64_t protect = 0;       // P
  int64_t first_a = 0;       // a0 = P + (P & 1): the first source position (even)
  int64_t first_b = 0;       // b0 = P + 1 - (P & 1): the first destination position (odd)
  int64_t set_a = 0;         // |A'|: the even positions in [P, N)
  int64_t set_b = 0;         // |B'|: the odd positions in [P, N)
  int64_t r = 0;
  int64_t rows() const { return tokens - r; }
};

BipartiteMergeArgs validate_bipartite_merge(const Tensor& x, const Tensor& metric,
                                            const std::optional<Tensor>& sizes,
                                            int64_t num_protected, int64_t r);

// On CPU dest_index's values are checked (in [0, N - r)); on CUDA that would need a
// synchronisation, so the kernels only guard against out-of-range values (an out-of-range
// token gets a zero gradient, nothing outside the tensors is read or written) and dest_index
// must come from the forward.
BipartiteMergeArgs validate_bipartite_merge_backward(const Tensor& grad_out,
                                                     const std::optional<Tensor>& sizes,
                                                     const Tensor& dest_index);

}  // namespace fisheradaptune
