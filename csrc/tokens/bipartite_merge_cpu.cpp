// CPU kernels of bipartite_merge and bipartite_merge_backward (Note [Bipartite merge],
// csrc/tokens/bipartite_merge.h). Four passes, each parallel and each output element produced by
// one thread in a fixed order, so bitwise deterministic for any thread count:
//   1. normalise the metric rows (per token);
//   2. each A token's best B token (per (batch row, A token)): its similarities to every B
//      token as one omp-simd pass over the transposed B vectors (Note [CPU vectorisation]);
//   3. the matching and the out-row bookkeeping (per batch row): nth_element over the A tokens,
//      dest_index, the rows' totals (row_totals, shared with the backward), and the sources of
//      every out row in increasing token order;
//   4. the out rows (per (batch row, out row)): a copy, or the weighted mean of the sources.
#include "common/validate.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "common/simd.h"
#include "tokens/bipartite_merge.h"

namespace fisheradaptune {
namespace {

// The unit vector of a metric row, in place: scaled by its largest magnitude first, so that
// squares cannot overflow (a bfloat16 key of 1e20 is a valid direction); a zero row stays zero
// (similarity 0 to everything), and a row with inf or NaN becomes NaN (it matches as NaN, never
// silently as 0).
template <typename A>
void normalise(A* v, int64_t n) {
  A top = 0;
  for (int64_t i = 0; i < n; ++i) top = std::max(top, std::abs(v[i]));
  bool finite = std::isfinite(top);
  for (int64_t i = 0; i < n && finite; ++i) finite = !std::isnan(v[i]);  // max() drops NaN
  if (!finite) {
    std::fill(v, v + n, std::numeric_limits<A>::quiet_NaN());
    return;
  }
  if (top == A(0)) return;
  for (int64_t i = 0; i < n; ++i) v[i] /= top;
  const A inv = A(1) / std::sqrt(blocked_dot<A, A>(v, v, n));
  for (int64_t i = 0; i < n; ++i) v[i] *= inv;
}

// sims[q][j] = a_q . bt[:, j] for four A tokens a_q (unused ones are zero vectors) and
// j < stride, with the B tokens' unit vectors transposed ([D, stride], stride a multiple of
// kLanes, zero-padded): the vector lanes run over B tokens, 4 x kLanes accumulators stay in
// registers across d, and every dot is summed over d in increasing order (deterministic, the
// same whatever the grouping or the padding).
constexpr int64_t kLanes = 16;

template <typename A>
FAT_CPU_CLONES void similarities(const A* const* a, const A* __restrict bt, int64_t dims,
                                 int64_t stride, A* __restrict sims) {
  const A* __restrict a0 = a[0];
  const A* __restrict a1 = a[1];
  const A* __restrict a2 = a[2];
  const A* __restrict a3 = a[3];
  for (int64_t j0 = 0; j0 < stride; j0 += kLanes) {
    A s0[kLanes] = {}, s1[kLanes] = {}, s2[kLanes] = {}, s3[kLanes] = {};
    for (int64_t d = 0; d < dims; ++d) {
      const A* __restrict row = bt + d * stride + j0;
      const A w0 = a0[d], w1 = a1[d], w2 = a2[d], w3 = a3[d];
      FAT_SIMD
      for (int64_t j = 0; j < kLanes; ++j) {
        const A v = row[j];
        s0[j] += w0 * v;
        s1[j] += w1 * v;
        s2[j] += w2 * v;
        s3[j] += w3 * v;
      }
    }
    for (int64_t j = 0; j < kLanes; ++j) {
      sims[j0 + j] = s0[j];
      sims[stride + j0 + j] = s1[j];
      sims[2 * stride + j0 + j] = s2[j];
      sims[3 * stride + j0 + j] = s3[j];
    }
  }
}

// The index of the best similarity in `beats` order: the first NaN if any, else the first
// maximum (a strict > keeps the lower index on ties).
template <typename A>
int32_t best_index(const A* sims, int64_t n) {
  int32_t arg = 0;
  A top = sims[0];
  if (std::isnan(top)) return 0;
  for (int64_t j = 1; j < n; ++j) {
    const A v = sims[j];
    if (std::isnan(v)) return static_cast<int32_t>(j);
    if (v > top) {
      top = v;
      arg = static_cast<int32_t>(j);
    }
  }
  return arg;
}

// Passes 1 and 2: best[b * |A'| + k], match[b * |A'| + k] = the best similarity of the k-th
// source (position first_a + 2k) of row b and the index j (within B', position first_b + 2j) of
// its destination.
template <typename M>
void best_matches(const BipartiteMergeArgs& a, std::vector<double>& best,
                  std::vector<int32_t>& match) {
  using A = opmath_t<M>;
  const int64_t B = a.batch, N = a.tokens, D = a.dims;
  const int64_t na = a.set_a, nb = a.set_b, first_a = a.first_a, first_b = a.first_b;
  std::vector<A> unit(B * N * D);
  const M* m = a.metric.const_data_ptr<M>();
  st::parallel_for(0, B * N, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      A* u = unit.data() + t * D;
      for (int64_t d = 0; d < D; ++d) u[d] = static_cast<A>(m[t * D + d]);
      normalise(u, D);
    }
  });
  // The B tokens' unit vectors transposed, per batch row: bt[b] is [D, stride], zero-padded.
  const int64_t stride = (nb + kLanes - 1) / kLanes * kLanes;
  std::vector<A> bt(B * D * stride, A(0));
  st::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t j = 0; j < nb; ++j) {
        const A* u = unit.data() + (b * N + first_b + 2 * j) * D;
        for (int64_t d = 0; d < D; ++d) bt[(b * D + d) * stride + j] = u[d];
      }
    }
  });
  // Units of work: up to four A tokens of one batch row.
  const int64_t groups = (na + 3) / 4;
  const std::vector<A> zeros(D, A(0));
  st::parallel_for(0, B * groups, 2, [&](int64_t u0, int64_t u1) {
    std::vector<A> sims(4 * stride);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / groups, k0 = (u % groups) * 4;
      const int64_t count = std::min<int64_t>(4, na - k0);
      const A* rows[4];
      for (int64_t q = 0; q < 4; ++q) {
        rows[q] = q < count ? unit.data() + (b * N + first_a + 2 * (k0 + q)) * D : zeros.data();
      }
      similarities<A>(rows, bt.data() + b * D * stride, D, stride, sims.data());
      for (int64_t q = 0; q < count; ++q) {
        const int32_t arg = best_index(sims.data() + q * stride, nb);
        best[b * na + k0 + q] = static_cast<double>(sims[q * stride + arg]);
        match[b * na + k0 + q] = arg;
      }
    }
  });
}

// Per batch row, from dest_index and the sizes, shared by the forward and the backward so both
// use one order: w[d] = the sum of the sizes of the tokens whose out row is d (float64, in
// increasing token order) and count[d], their number.
void row_totals(const int64_t* dest, const float* sz, int64_t N, int64_t R, double* w,
                int32_t* count) {
  std::fill(w, w + R, 0.0);
  std::fill(count, count + R, 0);
  for (int64_t i = 0; i < N; ++i) {
    w[dest[i]] += sz != nullptr ? static_cast<double>(sz[i]) : 1.0;
    ++count[dest[i]];
  }
}

// A token's coefficient in its out row (Note [Bipartite merge]): 1 for a row's sole source (a
// bitwise copy), s_i / W otherwise, 0 when W == 0.
inline double coefficient(int32_t count, double w, const float* sz, int64_t i) {
  if (count == 1) return 1.0;
  return w != 0 ? (sz != nullptr ? static_cast<double>(sz[i]) : 1.0) / w : 0.0;
}

std::tuple<Tensor, Tensor, Tensor> bipartite_merge_cpu(
    const Tensor& x_in, const Tensor& metric_in, const std::optional<Tensor>& sizes_in,
    int64_t num_protected, int64_t r) {
  const BipartiteMergeArgs a = validate_bipartite_merge(x_in, metric_in, sizes_in, num_protected, r);
  const int64_t B = a.batch, N = a.tokens, C = a.channels, P = a.protect, R = a.rows();
  const int64_t na = a.set_a, nb = a.set_b, first_a = a.first_a, first_b = a.first_b;
  Tensor out = empty({B, R, C}, a.x.scalar_type(), a.x.device());
  Tensor out_sizes = empty({B, R}, ScalarType::Float, a.x.device());
  Tensor dest_index = empty({B, N}, ScalarType::Long, a.x.device());
  if (B == 0 || N == 0) return {out, out_sizes, dest_index};

  // Passes 1-2. The best similarities are compared in metric's opmath type; held as double,
  // which represents both exactly.
  std::vector<double> best(B * na);
  std::vector<int32_t> match(B * na);
  if (r > 0) {
    FAT_DISPATCH_TOKEN_TYPES(a.metric.scalar_type(), "bipartite_merge_match", [&] {
      best_matches<scalar_t>(a, best, match);
    });
  }

  // Pass 3. The sources of every out row in increasing token order (CSR: off, src) and their
  // coefficients, written straight into per-batch-row slices.
  const float* sizes = a.sizes.defined() ? a.sizes.const_data_ptr<float>() : nullptr;
  int64_t* dest = dest_index.mutable_data_ptr<int64_t>();
  float* osz = out_sizes.mutable_data_ptr<float>();
  std::vector<int32_t> off(B * (R + 1)), src(B * N);
  std::vector<double> coef(B * N);
  st::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int32_t> order(na), count(R), fill(R);
    std::vector<char> merged(na);
    std::vector<double> w(R);
    for (int64_t b = b0; b < b1; ++b) {
      const double* bb = best.data() + b * na;
      const int32_t* mb = match.data() + b * na;
      std::fill(merged.begin(), merged.end(), 0);
      if (r > 0) {
        std::iota(order.begin(), order.end(), 0);
        std::nth_element(order.begin(), order.begin() + r, order.end(),
                         [&](int32_t i, int32_t j) { return beats(bb[i], i, bb[j], j); });
        for (int64_t k = 0; k < r; ++k) merged[order[k]] = 1;
      }
      int64_t* db = dest + b * N;
      for (int64_t i = 0; i < P; ++i) db[i] = i;
      const int64_t row_b = P + na - r;  // the out row of the first B' token
      int64_t next = P;
      for (int64_t k = 0; k < na; ++k) {
        db[first_a + 2 * k] = merged[k] ? row_b + mb[k] : next++;
      }
      for (int64_t j = 0; j < nb; ++j) db[first_b + 2 * j] = row_b + j;
      const float* sz = sizes != nullptr ? sizes + b * N : nullptr;
      row_totals(db, sz, N, R, w.data(), count.data());
      int32_t* ob = off.data() + b * (R + 1);
      ob[0] = 0;
      for (int64_t d = 0; d < R; ++d) {
        ob[d + 1] = ob[d] + count[d];
        fill[d] = ob[d];
        osz[b * R + d] = static_cast<float>(w[d]);
      }
      for (int64_t i = 0; i < N; ++i) {
        const int32_t slot = fill[db[i]]++;
        src[b * N + slot] = static_cast<int32_t>(i);
        coef[b * N + slot] = coefficient(count[db[i]], w[db[i]], sz, i);
      }
    }
  });

  // Pass 4.
  FAT_DISPATCH_TOKEN_TYPES(a.x.scalar_type(), "bipartite_merge_cpu", [&] {
    using T = scalar_t;
    using A = opmath_t<T>;
    const T* x = a.x.const_data_ptr<T>();
    T* o = out.mutable_data_ptr<T>();
    st::parallel_for(0, B * R, 4, [&](int64_t u0, int64_t u1) {
      std::vector<A> acc(C);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / R, d = u % R;
        const int32_t* ob = off.data() + b * (R + 1);
        const int32_t* sb = src.data() + b * N;
        const double* cb = coef.data() + b * N;
        const T* xb = x + b * N * C;
        T* dst = o + u * C;
        if (ob[d + 1] - ob[d] == 1) {
          std::memcpy(dst, xb + static_cast<int64_t>(sb[ob[d]]) * C, C * sizeof(T));
          continue;
        }
        std::fill(acc.begin(), acc.end(), A(0));
        for (int32_t s = ob[d]; s < ob[d + 1]; ++s) {
          // Note [Zero coefficients] (csrc/tokens/token_prune_merge.h): exactly 0 in float64 adds
          // nothing; any other coefficient takes part, also one that underflows in A (Note [Merge
          // weights]).
          if (cb[s] == 0.0) continue;
          axpy_coef<T, A>(acc.data(), xb + static_cast<int64_t>(sb[s]) * C, cb[s], C);
        }
        store<T, A>(dst, acc.data(), C);
      }
    });
  });
  return {out, out_sizes, dest_index};
}

Tensor bipartite_merge_backward_cpu(const Tensor& grad_out,
                                    const std::optional<Tensor>& sizes_in,
                                    const Tensor& dest_index) {
  const BipartiteMergeArgs a = validate_bipartite_merge_backward(grad_out, sizes_in, dest_index);
  const int64_t B = a.batch, N = a.tokens, C = a.channels, R = a.rows();
  Tensor grad_x = empty({B, N, C}, a.grad.scalar_type(), a.grad.device());
  if (B == 0 || N == 0) return grad_x;
  const float* sizes = a.sizes.defined() ? a.sizes.const_data_ptr<float>() : nullptr;
  const int64_t* dest = a.dest.const_data_ptr<int64_t>();
  // The out rows' totals, as in the forward; a token's gradient is its coefficient times its
  // row's, or that row copied bitwise when it is the row's sole source (a count, not a
  // sentinel coefficient: sizes may be negative, and so may s_i / W).
  std::vector<double> w(B * R);
  std::vector<int32_t> count(B * R);
  st::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      row_totals(dest + b * N, sizes != nullptr ? sizes + b * N : nullptr, N, R, w.data() + b * R,
                 count.data() + b * R);
    }
  });
  FAT_DISPATCH_TOKEN_TYPES(a.grad.scalar_type(), "bipartite_merge_backward_cpu", [&] {
    using T = scalar_t;
    using A = opmath_t<T>;
    const T* g = a.grad.const_data_ptr<T>();
    T* gx = grad_x.mutable_data_ptr<T>();
    st::parallel_for(0, B * N, 8, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / N, row = b * R + dest[t];
        const T* from = g + row * C;
        if (count[row] == 1) {
          std::memcpy(gx + t * C, from, C * sizeof(T));
        } else {
          const double c = coefficient(count[row], w[row], sizes != nullptr ? sizes + b * N : nullptr,
                                       t % N);
          scale_coef<T, A>(gx + t * C, from, c, C);  // Note [Merge weights]
        }
      }
    });
  });
  return grad_x;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fisheradaptune, CPU, m) {
  m.impl("bipartite_merge", TORCH_BOX(&bipartite_merge_cpu));
  m.impl("bipartite_merge_backward", TORCH_BOX(&bipartite_merge_backward_cpu));
}

}  // namespace fisheradaptune
