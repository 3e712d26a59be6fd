// CPU kernels of token_prune_merge and token_prune_merge_backward (Note [Token prune-merge],
// csrc/tokens/token_prune_merge.h). Selection runs per row (nth_element with an index tie-break);
// the copies and the fused token run in parallel over (row, block of channels), the fused token's
// sum as an omp-simd axpy per merged token (Note [CPU vectorisation]). Every output element is
// produced by one thread in a fixed order: bitwise deterministic for any thread count.
#include "common/validate.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "common/simd.h"
#include "tokens/token_prune_merge.h"

namespace fisheradaptune {
namespace {

constexpr int64_t kChannelBlock = 512;  // channels per unit of parallel work (forward)

// Selection order (beats, common/simd.h) over a row of scores.
template <typename A>
struct Better {
  const A* s;
  bool operator()(int32_t i, int32_t j) const { return beats(s[i], i, s[j], j); }
};

// Note [Merge weights] (tokens/token_prune_merge.h): w_i = scores_i * sizes_i, W and the
// coefficients (coef_i = w_i / W, or w_i) in float64, in merged order.
template <typename A>
void weights(const A* scores, const float* sizes, const int32_t* merged, int64_t count,
             bool normalize, double* coef, double& total) {
  double w_sum = 0;
  for (int64_t j = 0; j < count; ++j) {
    const int32_t i = merged[j];
    const double w = static_cast<double>(scores[i]) * (sizes ? static_cast<double>(sizes[i]) : 1.0);
    coef[j] = w;
    w_sum += w;
  }
  total = w_sum;
  if (normalize) {
    for (int64_t j = 0; j < count; ++j) coef[j] = w_sum != 0.0 ? coef[j] / w_sum : 0.0;
  }
}

// blocked_dot (common/simd.h) with x's inf/NaN values read as 0 (Note [Zero coefficients]): the
// same blocks and order, so bitwise blocked_dot's for a finite x.
template <typename T, typename A>
FAT_CPU_CLONES A finite_dot(const T* __restrict x, const T* __restrict y, int64_t n) {
  constexpr A kMax = std::numeric_limits<A>::max();
  double total = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    A acc = 0;
    FAT_SIMD_REDUCE(acc)
    for (int64_t i = b; i < e; ++i) {
      const A xv = static_cast<A>(x[i]);
      acc += (std::abs(xv) <= kMax ? xv : A(0)) * static_cast<A>(y[i]);  // NaN compares false
    }
    total += static_cast<double>(acc);
  }
  return static_cast<A>(total);
}

std::tuple<Tensor, Tensor, Tensor> token_prune_merge_cpu(
    const Tensor& x_in, const Tensor& scores_in, const std::optional<Tensor>& sizes_in,
    int64_t num_protected, int64_t keep_in, bool normalize) {
  const TokenPruneMergeArgs a =
      validate_token_prune_merge(x_in, scores_in, sizes_in, num_protected, keep_in);
  const int64_t B = a.batch, N = a.tokens, C = a.channels, P = a.protect, M = a.cand;
  const int64_t keep = a.keep, R = a.rows(), nm = M - keep;
  Tensor out = empty({B, R, C}, a.x.scalar_type(), a.x.device());
  Tensor kept_index = empty({B, keep}, ScalarType::Long, a.x.device());
  Tensor out_sizes = empty({B, R}, ScalarType::Float, a.x.device());
  if (B == 0) return {out, kept_index, out_sizes};

  FAT_DISPATCH_TOKEN_TYPES(a.x.scalar_type(), "token_prune_merge_cpu", [&] {
    using T = scalar_t;
    using A = opmath_t<T>;
    std::vector<int32_t> kept_idx(B * keep), merged_idx(B * nm);
    std::vector<double> coef(B * nm);
    const float* sizes = a.sizes.defined() ? a.sizes.const_data_ptr<float>() : nullptr;
    int64_t* kept_out = kept_index.mutable_data_ptr<int64_t>();
    float* sizes_out = out_sizes.mutable_data_ptr<float>();
    // Read once here, not per row: each dtype or data-pointer query is a call into libtorch.
    const ScalarType score_type = a.scores.scalar_type();
    const void* scores = a.scores.const_data_ptr();

    // 1. Selection, weights and sizes, one row at a time.
    st::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<A> s(M);
      std::vector<int32_t> idx(M);
      for (int64_t b = b0; b < b1; ++b) {
        FAT_DISPATCH_TOKEN_TYPES(score_type, "token_scores", [&] {
          const scalar_t* sc = static_cast<const scalar_t*>(scores) + b * M;
          for (int64_t i = 0; i < M; ++i) s[i] = static_cast<A>(sc[i]);
        });
        std::iota(idx.begin(), idx.end(), 0);
        std::nth_element(idx.begin(), idx.begin() + keep, idx.end(), Better<A>{s.data()});
        std::sort(idx.begin(), idx.begin() + keep);
        std::sort(idx.begin() + keep, idx.end());
        std::copy(idx.begin(), idx.begin() + keep, kept_idx.begin() + b * keep);
        std::copy(idx.begin() + keep, idx.end(), merged_idx.begin() + b * nm);
        const float* sz = sizes ? sizes + b * N : nullptr;
        double total = 0;
        weights<A>(s.data(), sz ? sz + P : nullptr, merged_idx.data() + b * nm, nm, normalize,
                   coef.data() + b * nm, total);
        for (int64_t j = 0; j < keep; ++j) kept_out[b * keep + j] = idx[j];
        float* so = sizes_out + b * R;
        for (int64_t r = 0; r < P; ++r) so[r] = sz ? sz[r] : 1.f;
        for (int64_t j = 0; j < keep; ++j) so[P + j] = sz ? sz[P + idx[j]] : 1.f;
        if (a.fused) {
          double fused = 0;
          for (int64_t j = keep; j < M; ++j) fused += sz ? sz[P + idx[j]] : 1.0;
          so[R - 1] = static_cast<float>(fused);
        }
      }
    });

    // 2. Rows: copies of the protected and kept tokens, and the fused token, per channel block.
    const int64_t blocks = std::max<int64_t>(1, (C + kChannelBlock - 1) / kChannelBlock);
    const T* x = a.x.const_data_ptr<T>();
    T* o = out.mutable_data_ptr<T>();
    st::parallel_for(0, B * blocks, 1, [&](int64_t u0, int64_t u1) {
      std::vector<A> acc(std::min(C, kChannelBlock));
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / blocks, c0 = (u % blocks) * kChannelBlock;
        const int64_t n = std::min(C - c0, kChannelBlock);
        if (n <= 0) continue;
        const T* xb = x + b * N * C + c0;
        T* ob = o + b * R * C + c0;
        for (int64_t r = 0; r < P; ++r) std::memcpy(ob + r * C, xb + r * C, n * sizeof(T));
        const int32_t* kb = kept_idx.data() + b * keep;
        for (int64_t j = 0; j < keep; ++j) {
          std::memcpy(ob + (P + j) * C, xb + (P + kb[j]) * C, n * sizeof(T));
        }
        if (!a.fused) continue;
        std::fill(acc.begin(), acc.begin() + n, A(0));
        const int32_t* mb = merged_idx.data() + b * nm;
        const double* cb = coef.data() + b * nm;
        for (int64_t j = 0; j < nm; ++j) {
          // Note [Zero coefficients] (tokens/token_prune_merge.h): a zero coefficient adds nothing,
          // even for an inf/NaN token (0 * inf would make the fused token NaN); any other takes
          // part, also one that underflows in A (Note [Merge weights]).
          if (cb[j] == 0.0) continue;
          axpy_coef<T, A>(acc.data(), xb + (P + mb[j]) * C, cb[j], n);
        }
        store<T, A>(ob + (R - 1) * C, acc.data(), n);
      }
    });
  });
  return {out, kept_index, out_sizes};
}

std::tuple<Tensor, Tensor> token_prune_merge_backward_cpu(
    const Tensor& grad_out, const Tensor& x_in, const Tensor& scores_in,
    const std::optional<Tensor>& sizes_in, const Tensor& kept_index,
    int64_t num_protected, bool normalize) {
  Tensor kept_t, grad_t;
  const TokenPruneMergeArgs a = validate_token_prune_merge_backward(
      grad_out, x_in, scores_in, sizes_in, kept_index, num_protected, kept_t, grad_t);
  const int64_t B = a.batch, N = a.tokens, C = a.channels, P = a.protect, M = a.cand;
  const int64_t keep = a.keep, R = a.rows(), nm = M - keep;
  Tensor grad_x = empty({B, N, C}, a.x.scalar_type(), a.x.device());
  Tensor grad_scores = empty({B, M}, a.scores.scalar_type(), a.scores.device());
  if (B == 0) return {grad_x, grad_scores};

  FAT_DISPATCH_TOKEN_TYPES(a.x.scalar_type(), "token_prune_merge_backward_cpu", [&] {
    using T = scalar_t;
    using A = opmath_t<T>;
    // row_of[b, i]: the out row of candidate i, or -1 when merged (then coef[b, i] applies).
    std::vector<int32_t> row_of(B * M, -1);
    std::vector<A> s(B * M), dots(B * M, A(0));
    std::vector<double> coef(B * M, 0.0), total(B);  // Note [Merge weights]
    std::vector<int32_t> merged_idx(B * nm);
    const float* sizes = a.sizes.defined() ? a.sizes.const_data_ptr<float>() : nullptr;
    const int64_t* kept = kept_t.const_data_ptr<int64_t>();
    FAT_DISPATCH_TOKEN_TYPES(a.scores.scalar_type(), "token_scores", [&] {
      const scalar_t* sc = a.scores.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < B * M; ++i) s[i] = static_cast<A>(sc[i]);
    });
    st::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      std::vector<double> c(nm);
      for (int64_t b = b0; b < b1; ++b) {
        int32_t* rb = row_of.data() + b * M;
        for (int64_t j = 0; j < keep; ++j) rb[kept[b * keep + j]] = static_cast<int32_t>(P + j);
        int32_t* mb = merged_idx.data() + b * nm;
        int64_t m = 0;
        for (int64_t i = 0; i < M; ++i) {
          if (rb[i] < 0) mb[m++] = static_cast<int32_t>(i);
        }
        weights<A>(s.data() + b * M, sizes ? sizes + b * N + P : nullptr, mb, nm, normalize,
                   c.data(), total[b]);
        for (int64_t j = 0; j < nm; ++j) coef[b * M + mb[j]] = c[j];
      }
    });
    const T* x = a.x.const_data_ptr<T>();
    const T* g = grad_t.const_data_ptr<T>();
    T* gx = grad_x.mutable_data_ptr<T>();
    // Token rows in parallel: copies for protected and kept tokens; coef * g_fused and the dot
    // product x_i . g_fused for merged ones.
    st::parallel_for(0, B * N, 8, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / N, i = t % N;
        T* dst = gx + t * C;
        const int32_t row = i < P ? static_cast<int32_t>(i) : row_of[b * M + i - P];
        if (row >= 0) {
          std::memcpy(dst, g + (b * R + row) * C, C * sizeof(T));
          continue;
        }
        const T* gf = g + (b * R + R - 1) * C;
        const double w = coef[b * M + i - P];
        scale_coef<T, A>(dst, gf, w, C);  // Note [Merge weights]
        // Note [Zero coefficients]: a token that weighs nothing takes part with its finite
        // values only.
        dots[b * M + i - P] = w != 0.0 ? blocked_dot<T, A>(x + t * C, gf, C)
                                       : finite_dot<T, A>(x + t * C, gf, C);
      }
    });
    FAT_DISPATCH_TOKEN_TYPES(a.scores.scalar_type(), "token_scores_grad", [&] {
      scalar_t* gs = grad_scores.mutable_data_ptr<scalar_t>();
      st::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int32_t* mb = merged_idx.data() + b * nm;
          const float* sz = sizes ? sizes + b * N + P : nullptr;
          // In float64 like the weights (Note [Merge weights]); the dots are A sums.
          const double W = total[b];
          double fg = 0;  // fused . g (normalize)
          if (normalize) {
            for (int64_t j = 0; j < nm; ++j) {
              const double w = coef[b * M + mb[j]];
              // Note [Zero coefficients]
              if (w != 0.0) fg += w * static_cast<double>(dots[b * M + mb[j]]);
            }
          }
          for (int64_t i = 0; i < M; ++i) gs[b * M + i] = static_cast<scalar_t>(0);
          for (int64_t j = 0; j < nm; ++j) {
            const int32_t i = mb[j];
            const double size = sz ? static_cast<double>(sz[i]) : 1.0;
            const double dot = static_cast<double>(dots[b * M + i]);
            const double d = normalize ? (W != 0.0 ? size * (dot - fg) / W : 0.0) : size * dot;
            gs[b * M + i] = static_cast<scalar_t>(static_cast<A>(d));
          }
        }
      });
    });
  });
  return {grad_x, grad_scores};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fisheradaptune, CPU, m) {
  m.impl("token_prune_merge", TORCH_BOX(&token_prune_merge_cpu));
  m.impl("token_prune_merge_backward", TORCH_BOX(&token_prune_merge_backward_cpu));
}

}  // namespace fisheradaptune
