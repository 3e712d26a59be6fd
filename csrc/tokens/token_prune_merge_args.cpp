#include "common/validate.h"

#include <cstdint>
#include <limits>

#include "tokens/token_prune_merge.h"

namespace fisheradaptune {

namespace {

TokenPruneMergeArgs check_common(const char* op, const Tensor& x, const Tensor& scores,
                                 const std::optional<Tensor>& sizes,
                                 int64_t num_protected) {
  TokenPruneMergeArgs a;
  read_token_input(op, x, a);
  FAT_CHECK_VALUE(num_protected >= 0 && num_protected < a.tokens, op, "num_protected",
                  "expected 0 <= num_protected < N = ", a.tokens, " (at least one token that ",
                  "can be pruned), got ", num_protected);
  a.protect = num_protected;
  a.cand = a.tokens - num_protected;
  check_device(op, "scores", scores, x.device());
  FAT_CHECK_VALUE(scores.dim() == 2 && scores.size(0) == a.batch && scores.size(1) == a.cand,
                  op, "scores", "expected shape [B, N - num_protected] = [", a.batch, ", ",
                  a.cand, "], got ", scores.sizes());
  FAT_CHECK_VALUE(
      scores.scalar_type() == x.scalar_type() || scores.scalar_type() == ScalarType::Float, op,
      "scores", "expected x's dtype (", x.scalar_type(), ") or float32, got ",
      scores.scalar_type());
  a.sizes = check_token_sizes(op, sizes, a.batch, a.tokens, x.device());
  a.x = as_contiguous(x);
  a.scores = as_contiguous(scores);
  return a;
}

}  // namespace

TokenPruneMergeArgs validate_token_prune_merge(const Tensor& x, const Tensor& scores,
                                               const std::optional<Tensor>& sizes,
                                               int64_t num_protected, int64_t keep) {
  constexpr const char* op = "token_prune_merge";
  TokenPruneMergeArgs a = check_common(op, x, scores, sizes, num_protected);
  FAT_CHECK_VALUE(keep >= 0 && keep <= a.cand, op, "keep",
                  "expected 0 <= keep <= N - num_protected = ", a.cand, ", got ", keep);
  a.keep = keep;
  a.fused = keep < a.cand;
  return a;
}

TokenPruneMergeArgs validate_token_prune_merge_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& scores,
    const std::optional<Tensor>& sizes, const Tensor& kept_index, int64_t num_protected,
    Tensor& kept, Tensor& grad) {
  constexpr const char* op = "token_prune_merge_backward";
  TokenPruneMergeArgs a = check_common(op, x, scores, sizes, num_protected);
  check_device(op, "kept_index", kept_index, x.device());
  FAT_CHECK_VALUE(kept_index.scalar_type() == ScalarType::Long, op, "kept_index",
                  "expected int64, got ", kept_index.scalar_type());
  FAT_CHECK_VALUE(kept_index.dim() == 2 && kept_index.size(0) == a.batch &&
                      kept_index.size(1) <= a.cand,
                  op, "kept_index", "expected shape [B, keep] = [", a.batch,
                  ", keep <= ", a.cand, "], got ", kept_index.sizes());
  a.keep = kept_index.size(1);
  a.fused = a.keep < a.cand;
  check_device(op, "grad_out", grad_out, x.device());
  FAT_CHECK_VALUE(grad_out.scalar_type() == x.scalar_type(), op, "grad_out",
                  "expected x's dtype (", x.scalar_type(), "), got ", grad_out.scalar_type());
  FAT_CHECK_VALUE(grad_out.dim() == 3 && grad_out.size(0) == a.batch &&
                      grad_out.size(1) == a.rows() && grad_out.size(2) == a.channels,
                  op, "grad_out", "expected shape [", a.batch, ", ", a.rows(), ", ", a.channels,
                  "], got ", grad_out.sizes());
  kept = as_contiguous(kept_index);
  grad = as_contiguous(grad_out);
  if (kept.is_cpu()) {
    const int64_t* k = kept.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < a.batch; ++b) {
      for (int64_t j = 0; j < a.keep; ++j) {
        const int64_t v = k[b * a.keep + j];
        const int64_t prev = j == 0 ? -1 : k[b * a.keep + j - 1];
        FAT_CHECK_VALUE(v > prev && v < a.cand, op, "kept_index",
                        "expected strictly increasing indices in [0, ", a.cand, ") per row, got ",
                        v, " at [", b, ", ", j, "]");
      }
    }
  }
  return a;
}

}  // namespace fisheradaptune
