// CPU kernel of per_sample_grad_sq_: BLAS batched GEMM per tile (fisher/per_sample_grad_sq.cpp),
// then a vectorised (Note [CPU vectorisation]), parallel square-and-accumulate over the tile's
// samples that skips and counts non-finite updates (Note [Skipping in per_sample_grad_sq_]).
#include "common/stable.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#include "common/simd.h"
#include "fisher/per_sample_grad_sq.h"

namespace fisheradaptune {
namespace {

constexpr int64_t kTileElems = int64_t(1) << 22;  // 16 MiB of float32 per-sample gradients

// Fisher elements per unit of work: a stack buffer of running sums, reused for every sample.
constexpr int64_t kColumns = 1024;

// Columns [j0, j0 + n) of the tile (n <= kColumns): r = carry (or 0) + sum_k t[k]^2, k in order,
// then either the Fisher update with the skip rule, or r back into carry. The product and the
// sum round separately (-ffp-contract=off): deterministic per element, whatever the lanes.
// Returns the number of skipped elements.
template <typename S>
FAT_CPU_CLONES int64_t square_columns(S* __restrict f, const S* __restrict t,
                                      S* __restrict carry, int64_t m, int64_t b, int64_t n,
                                      S s, bool first, bool last) {
  constexpr S kMax = std::numeric_limits<S>::max();
  S r[kColumns];
  if (first) {
    std::fill(r, r + n, S(0));
  } else {
    std::copy(carry, carry + n, r);
  }
  for (int64_t k = 0; k < b; ++k) {
    const S* __restrict row = t + k * m;
    FAT_SIMD
    for (int64_t i = 0; i < n; ++i) r[i] += row[i] * row[i];
  }
  if (!last) {
    std::copy(r, r + n, carry);
    return 0;
  }
  int32_t bad = 0;  // n <= kColumns: no overflow
  FAT_SIMD_REDUCE(bad)
  for (int64_t i = 0; i < n; ++i) {
    const S old = f[i];
    const S updated = old + s * r[i];
    const bool ok = std::abs(updated) <= kMax;  // Note [Skipping]: false for NaN too
    f[i] = ok ? updated : old;
    bad += ok ? 0 : 1;
  }
  return bad;
}

void square_accumulate_cpu(const Tensor& fisher, const Tensor& tile, double scale,
                           const Tensor& carry, bool first, bool last, const Tensor& nonfinite) {
  const int64_t b = tile.size(0), m = fisher.numel();
  const int64_t units = (m + kColumns - 1) / kColumns;
  std::atomic<int64_t> skipped{0};  // integer sum: exact in any order
  FAT_DISPATCH_FLOATING(fisher.scalar_type(), "square_accumulate_cpu", [&] {
    using S = scalar_t;
    S* f = fisher.mutable_data_ptr<S>();
    const S* t = tile.const_data_ptr<S>();
    S* c = carry.defined() ? carry.mutable_data_ptr<S>() : nullptr;
    const auto s = static_cast<S>(scale);
    st::parallel_for(0, units, 16, [&](int64_t u0, int64_t u1) {
      int64_t bad = 0;
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t j = u * kColumns, n = std::min(kColumns, m - j);
        bad += square_columns<S>(f + j, t + j, c != nullptr ? c + j : nullptr, m, b, n, s,
                                 first, last);
      }
      if (bad != 0) skipped.fetch_add(bad, std::memory_order_relaxed);
    });
  });
  if (last) nonfinite.mutable_data_ptr<int64_t>()[0] += skipped.load();
}

void per_sample_grad_sq_cpu(const Tensor& fisher, const Tensor& x, const Tensor& grad_out,
                            double scale, const Tensor& nonfinite) {
  per_sample_grad_sq(fisher, x, grad_out, scale, nonfinite, kTileElems, &square_accumulate_cpu);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fisheradaptune, CPU, m) {
  m.impl("per_sample_grad_sq_", TORCH_BOX(&per_sample_grad_sq_cpu));
}

}  // namespace fisheradaptune
