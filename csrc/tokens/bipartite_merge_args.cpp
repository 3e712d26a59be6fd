#include "common/validate.h"

#include <algorithm>
#include <cstdint>

#include "tokens/bipartite_merge.h"

namespace fisheradaptune {

BipartiteMergeArgs validate_bipartite_merge(const Tensor& x, const Tensor& metric,
                                            const std::optional<Tensor>& sizes,
                                            int64_t num_protected, int64_t r) {
  constexpr const char* op = "bipartite_merge";
  BipartiteMergeArgs a;
  read_token_input(op, x, a);
  check_device(op, "metric", metric, x.device());
  FAT_CHECK_VALUE(metric.dim() == 3 && metric.size(0) == a.batch && metric.size(1) == a.tokens,
                  op, "metric", "expected shape [B, N, D] with [B, N] = [", a.batch, ", ",
                  a.tokens, "], got ", metric.sizes());
  check_token_dtype(op, "metric", metric);
  a.dims = metric.size(2);
  a.sizes = check_token_sizes(op, sizes, a.batch, a.tokens, x.device());
  FAT_CHECK_VALUE(num_protected >= 0 && num_protected <= a.tokens, op, "num_protected",
                  "expected 0 <= num_protected <= N = ", a.tokens, ", got ", num_protected);
  a.protect = num_protected;
  // Note [Bipartite merge]: A = even positions, B = odd positions, protected ones excluded.
  a.first_a = num_protected + (num_protected & 1);
  a.first_b = num_protected + 1 - (num_protected & 1);
  a.set_a = std::max<int64_t>(0, (a.tokens - a.first_a + 1) / 2);
  a.set_b = std::max<int64_t>(0, (a.tokens - a.first_b + 1) / 2);
  const int64_t bound = (a.tokens - num_protected) / 2;  // min(|A'|, |B'|)
  FAT_CHECK_VALUE(r >= 0 && r <= bound, op, "r", "expected 0 <= r <= (N - num_protected) // 2 = ",
                  bound, " (ToMe's bound: each merge needs its own source and destination), got ",
                  r);
  a.r = r;
  a.x = as_contiguous(x);
  a.metric = as_contiguous(metric);
  return a;
}

BipartiteMergeArgs validate_bipartite_merge_backward(const Tensor& grad_out,
                                                     const std::optional<Tensor>& sizes,
                                                     const Tensor& dest_index) {
  constexpr const char* op = "bipartite_merge_backward";
  FAT_CHECK_VALUE(grad_out.dim() == 3, op, "grad_out", "expected [B, N - r, C], got shape ",
                  grad_out.sizes());
  check_token_dtype(op, "grad_out", grad_out);
  check_device(op, "dest_index", dest_index, grad_out.device());
  FAT_CHECK_VALUE(dest_index.scalar_type() == ScalarType::Long, op, "dest_index",
                  "expected int64, got ", dest_index.scalar_type());
  BipartiteMergeArgs a;
  a.batch = grad_out.size(0);
  a.channels = grad_out.size(2);
  FAT_CHECK_VALUE(dest_index.dim() == 2 && dest_index.size(0) == a.batch &&
                      dest_index.size(1) >= grad_out.size(1),
                  op, "dest_index", "expected shape [B, N] = [", a.batch, ", N >= ",
                  grad_out.size(1), "] (N - r out rows), got ", dest_index.sizes());
  a.tokens = dest_index.size(1);
  check_token_count(op, "dest_index", a.tokens);
  a.r = a.tokens - grad_out.size(1);
  a.sizes = check_token_sizes(op, sizes, a.batch, a.tokens, grad_out.device());
  a.grad = as_contiguous(grad_out);
  a.dest = as_contiguous(dest_index);
  if (a.dest.is_cpu()) {
    const int64_t* d = a.dest.const_data_ptr<int64_t>();
    const int64_t rows = a.rows();
    for (int64_t i = 0; i < a.batch * a.tokens; ++i) {
      FAT_CHECK_VALUE(d[i] >= 0 && d[i] < rows, op, "dest_index", "expected values in [0, ",
                      rows, ") (the out rows), got ", d[i], " at [", i / a.tokens, ", ",
                      i % a.tokens, "]");
    }
  }
  return a;
}

}  // namespace fisheradaptune
