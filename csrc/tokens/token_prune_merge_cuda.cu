// CUDA kernels of token_prune_merge and token_prune_merge_backward (semantics: Note [Token
// prune-merge], csrc/tokens/token_prune_merge.h; CPU twin: csrc/tokens/token_prune_merge_cpu.cpp).
//
// Forward, two launches on the current stream:
//   1. select_kernel, one block per batch row: each candidate's rank is the number of
//      candidates that beat it (higher score, NaN first, ties to the lower index), so candidate
//      i is kept iff rank < keep; O(M^2 / kThreads) comparisons per thread-block, with the scores
//      in shared memory when they fit (kSmemBytes) and read from global memory otherwise.
//      A block scan in index order turns the kept flags into positions: kept_index, the source
//      token of every out row, and the merged list with its weights; W and the fused size are
//      fixed-tree block sums (Note [Fixed-shape reductions], common/multi_tensor.cuh).
//   2. rows_kernel, a block per (batch row, out row), grid-striding over the out rows: a
//      (16-byte vectorised when aligned) row copy, or for the fused row a per-channel sum over
//      the merged tokens in index order.
// Backward, three launches: prep (row of each candidate, weights, W; one block per batch row),
// rows (a block per token, grid-striding over the tokens: a copy, or coef * g_fused and the dot
// x_i . g_fused by a fixed-tree block sum), scores (one block per batch row). No float atomics:
// bitwise deterministic.
//
// Grid limits: batch rows run on grid.x (up to 2^31 - 1); rows and tokens run on grid.y, capped
// at kMaxGridY = 65535 blocks, beyond which each block takes every kMaxGridY-th row/token, so
// neither N nor the out row count is limited by the grid (token indices are int32: N < 2^31,
// checked for both backends by the shared validation).
//
// Instantiations (Note [Token dtypes]): validation admits x in {float32, bfloat16, float16,
// float64} and scores of x's dtype or float32, so the score kernels are instantiated for those
// 7 (x, scores) pairs only, not for every pair of the four dtypes.
#include "common/validate.h"

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>

#include "common/multi_tensor.cuh"
#include "tokens/token_prune_merge.h"
#include "tokens/tokens_cuda.cuh"

namespace fisheradaptune {
namespace {

using mt::copy_row;
using mt::kThreads;
using tok::beats;
using tok::grid_y;
using tok::kMaxGridY;

// Scores kept in shared memory per block (up to kMaxDynamicSmem, 32 KiB, so that with the
// reductions' static shared memory a block stays under the 48 KiB that needs no opt-in: Note
// [Launch resources]); longer rows read global memory.
constexpr int64_t kSmemBytes = mt::kMaxDynamicSmem;

// Note [Token dtypes]: calls f(S{}) with S the scores' element type, which validation restricts
// to T (x's type) or float: one instantiation for float32 x, two for the others.
template <typename T, typename F>
void with_score_type(ScalarType scores, F&& f) {
  if constexpr (std::is_same_v<T, float>) {
    FAT_INTERNAL_ASSERT(scores == ScalarType::Float);
    f(float{});
  } else {
    if (scores == ScalarType::Float) {
      f(float{});
    } else {
      FAT_INTERNAL_ASSERT(scores == tho::CppTypeToScalarType<T>::value);
      f(T{});
    }
  }
}

template <typename S, typename A>
struct ScoreRow {
  const S* global;  // this row's scores
  const A* shared;  // or null
  __device__ __forceinline__ A operator[](int64_t i) const {
    return shared != nullptr ? shared[i] : static_cast<A>(global[i]);
  }
};

template <typename S, typename A>
__global__ void __launch_bounds__(kThreads)
    select_kernel(const S* __restrict__ scores, const float* __restrict__ sizes,
                  int64_t N, int64_t P, int64_t M, int64_t keep, bool normalize, bool use_smem,
                  int64_t* __restrict__ kept_index, int32_t* __restrict__ src,
                  int32_t* __restrict__ merged, double* __restrict__ coef,
                  float* __restrict__ out_sizes) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const int64_t b = blockIdx.x;
  const int64_t nm = M - keep;
  const int64_t R = P + keep + (nm > 0 ? 1 : 0);
  const S* srow = scores + b * M;
  const float* zrow = sizes != nullptr ? sizes + b * N : nullptr;
  if (use_smem) {
    for (int64_t i = threadIdx.x; i < M; i += kThreads) smem[i] = static_cast<A>(srow[i]);
    __syncthreads();
  }
  const ScoreRow<S, A> s{srow, use_smem ? smem : nullptr};
  int64_t* krow = kept_index + b * keep;
  int32_t* srcrow = src + b * (P + keep);
  int32_t* mrow = merged + b * nm;
  double* crow = coef + b * nm;
  float* orow = out_sizes + b * R;
  for (int64_t r = threadIdx.x; r < P; r += kThreads) {
    srcrow[r] = static_cast<int32_t>(r);
    orow[r] = zrow != nullptr ? zrow[r] : 1.f;
  }
  // Note [Merge weights] (tokens/token_prune_merge.h): weights, W, coefficients in float64.
  double w_sum = 0;
  double size_sum = 0;  // in float64, as the CPU's and the reference's (3e38 + 3e38 - 3e38)
  int64_t kept_before = 0;  // kept candidates in earlier chunks (uniform over the block)
  for (int64_t base = 0; base < M; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    bool kept = false;
    if (i < M) {
      const A si = s[i];
      int64_t rank = 0;
      for (int64_t j = 0; j < M && rank < keep; ++j) rank += beats(s[j], j, si, i) ? 1 : 0;
      kept = rank < keep;
    }
    const int32_t flag = kept ? 1 : 0;
    const int32_t pos = mt::block_exclusive_scan(flag);
    if (i < M) {
      const float size = zrow != nullptr ? zrow[P + i] : 1.f;
      if (kept) {
        const int64_t k = kept_before + pos;
        krow[k] = i;
        srcrow[P + k] = static_cast<int32_t>(P + i);
        orow[P + k] = size;
      } else {
        const int64_t m = i - (kept_before + pos);
        const double w = static_cast<double>(s[i]) * static_cast<double>(size);
        mrow[m] = static_cast<int32_t>(i);
        crow[m] = w;
        w_sum += w;
        size_sum += static_cast<double>(size);
      }
    }
    kept_before += mt::block_sum_all(flag);
  }
  if (nm == 0) return;
  const double total = mt::block_sum_all(w_sum);
  const double fused_size = mt::block_sum(size_sum);
  if (threadIdx.x == 0) orow[R - 1] = static_cast<float>(fused_size);
  if (normalize) {
    // crow was written by other threads of this block: __syncthreads (inside block_sum_all)
    // made those writes visible.
    for (int64_t m = threadIdx.x; m < nm; m += kThreads) {
      crow[m] = total != 0.0 ? crow[m] / total : 0.0;
    }
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    rows_kernel(const T* __restrict__ x, T* __restrict__ out, const int32_t* __restrict__ src,
                const int32_t* __restrict__ merged, const double* __restrict__ coef, int64_t N,
                int64_t C, int64_t P, int64_t keep, int64_t nm) {
  const int64_t b = blockIdx.x;
  const int64_t R = P + keep + (nm > 0 ? 1 : 0);
  const T* xb = x + b * N * C;
  // Grid-stride over the out rows (uniform per block: no barrier inside).
  for (int64_t r = blockIdx.y; r < R; r += gridDim.y) {
    T* orow = out + (b * R + r) * C;
    if (r < P + keep) {
      copy_row(orow, xb + static_cast<int64_t>(src[b * (P + keep) + r]) * C, C);
      continue;
    }
    const int32_t* mrow = merged + b * nm;
    const double* crow = coef + b * nm;
    const T* cand = xb + P * C;
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      A acc = 0;
      for (int64_t j = 0; j < nm; ++j) {
        // Note [Zero coefficients] (tokens/token_prune_merge.h): a zero coefficient adds nothing,
        // even for an inf/NaN token; any other takes part, also one that underflows in A (Note
        // [Merge weights]). The branches are uniform over the block (same j for every thread).
        const double w = crow[j];
        if (w == 0.0) continue;
        acc += tok::scaled<A>(w, tok::fits_accumulation<A>(w),
                              static_cast<A>(cand[static_cast<int64_t>(mrow[j]) * C + c]));
      }
      orow[c] = static_cast<T>(acc);
    }
  }
}

// The launch shape's own limit: one block per batch row on grid.x. (The int32 token index
// limit, N < 2^31, is checked for both backends in check_common,
// csrc/tokens/token_prune_merge_args.cpp.)
void check_launch_shape(const char* op, int64_t B) {
  FAT_CHECK_VALUE(B <= std::numeric_limits<int32_t>::max(), op, "x",
                  "at most 2^31 - 1 batch rows on CUDA, got ", B);
}

std::tuple<Tensor, Tensor, Tensor> token_prune_merge_cuda(
    const Tensor& x_in, const Tensor& scores_in, const std::optional<Tensor>& sizes_in,
    int64_t num_protected, int64_t keep_in, bool normalize) {
  const TokenPruneMergeArgs a =
      validate_token_prune_merge(x_in, scores_in, sizes_in, num_protected, keep_in);
  const mt::TensorDeviceGuard guard(a.x);
  const cudaStream_t stream = mt::current_stream(a.x.get_device_index());
  const Device device = a.x.device();
  const int64_t B = a.batch, N = a.tokens, C = a.channels, P = a.protect, M = a.cand;
  const int64_t keep = a.keep, R = a.rows(), nm = M - keep;
  Tensor out = empty({B, R, C}, a.x.scalar_type(), device);
  Tensor kept_index = empty({B, keep}, ScalarType::Long, device);
  Tensor out_sizes = empty({B, R}, ScalarType::Float, device);
  if (B == 0) return {out, kept_index, out_sizes};
  check_launch_shape("token_prune_merge", B);
  Tensor src = empty({B, P + keep}, ScalarType::Int, device);
  Tensor merged = empty({B, nm}, ScalarType::Int, device);
  const float* sizes = a.sizes.defined() ? a.sizes.const_data_ptr<float>() : nullptr;
  FAT_DISPATCH_TOKEN_TYPES(a.x.scalar_type(), "token_prune_merge_cuda", [&] {
    using T = scalar_t;
    using A = opmath_t<T>;
    Tensor coef = empty({B, nm}, ScalarType::Double, device);
    const bool use_smem = M * static_cast<int64_t>(sizeof(A)) <= kSmemBytes;
    const size_t smem = use_smem ? static_cast<size_t>(M) * sizeof(A) : 0;
    with_score_type<T>(a.scores.scalar_type(), [&](auto score_tag) {
      using S = decltype(score_tag);
      select_kernel<S, A><<<static_cast<unsigned>(B), kThreads, smem, stream>>>(
          a.scores.const_data_ptr<S>(), sizes, N, P, M, keep, normalize, use_smem,
          kept_index.mutable_data_ptr<int64_t>(), src.mutable_data_ptr<int32_t>(),
          merged.mutable_data_ptr<int32_t>(), coef.mutable_data_ptr<double>(),
          out_sizes.mutable_data_ptr<float>());
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (C > 0) {
      const dim3 grid(static_cast<unsigned>(B), grid_y(R));
      rows_kernel<T, A><<<grid, kThreads, 0, stream>>>(
          a.x.const_data_ptr<T>(), out.mutable_data_ptr<T>(), src.const_data_ptr<int32_t>(),
          merged.const_data_ptr<int32_t>(), coef.const_data_ptr<double>(), N, C, P, keep, nm);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, kept_index, out_sizes};
}

// ---------------------------------------------------------------------------------------------
// Backward

template <typename S, typename A>
__global__ void __launch_bounds__(kThreads)
    backward_prep_kernel(const S* __restrict__ scores, const float* __restrict__ sizes,
                         const int64_t* __restrict__ kept_index, int64_t N, int64_t P, int64_t M,
                         int64_t keep, bool normalize, int32_t* __restrict__ row_of,
                         double* __restrict__ coef, double* __restrict__ total) {
  const int64_t b = blockIdx.x;
  int32_t* rrow = row_of + b * M;
  double* crow = coef + b * M;
  const S* srow = scores + b * M;
  const float* zrow = sizes != nullptr ? sizes + b * N + P : nullptr;
  for (int64_t i = threadIdx.x; i < M; i += kThreads) rrow[i] = -1;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < keep; j += kThreads) {
    const int64_t i = kept_index[b * keep + j];
    if (0 <= i && i < M) rrow[i] = static_cast<int32_t>(P + j);  // out of range: ignored
  }
  __syncthreads();
  double w_sum = 0;  // Note [Merge weights]: as the forward, in float64
  for (int64_t i = threadIdx.x; i < M; i += kThreads) {
    double w = 0;
    if (rrow[i] < 0) {
      w = static_cast<double>(static_cast<A>(srow[i])) *
          (zrow != nullptr ? static_cast<double>(zrow[i]) : 1.0);
      w_sum += w;
    }
    crow[i] = w;
  }
  const double W = mt::block_sum_all(w_sum);
  if (threadIdx.x == 0) total[b] = W;
  if (normalize) {
    for (int64_t i = threadIdx.x; i < M; i += kThreads) {
      crow[i] = W != 0.0 ? crow[i] / W : 0.0;  // each thread rescales what it wrote
    }
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    backward_rows_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                         const int32_t* __restrict__ row_of, const double* __restrict__ coef,
                         int64_t N, int64_t C, int64_t P, int64_t M, int64_t R,
                         T* __restrict__ grad_x, A* __restrict__ dots) {
  const int64_t b = blockIdx.x;
  // Grid-stride over the tokens. `row` depends on (b, t) only, so every thread of the block
  // takes the same branch and block_sum's barriers are reached by all of them.
  for (int64_t t = blockIdx.y; t < N; t += gridDim.y) {
    T* dst = grad_x + (b * N + t) * C;
    const int32_t row = t < P ? static_cast<int32_t>(t) : row_of[b * M + t - P];
    if (row >= 0) {
      copy_row(dst, grad_out + (b * R + row) * C, C);
      continue;
    }
    const T* gf = grad_out + (b * R + R - 1) * C;
    const T* xr = x + (b * N + t) * C;
    const double w = coef[b * M + t - P];
    // Note [Zero coefficients]: a token that weighs nothing takes part with its finite values
    // only (uniform over the block). Note [Merge weights]: w * g in float64 when w does not fit A.
    const bool weightless = w == 0.0;
    const bool fits = weightless || tok::fits_accumulation<A>(w);
    A d = 0;
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      const A g = static_cast<A>(gf[c]);
      dst[c] = static_cast<T>(tok::scaled<A>(w, fits, g));
      const A xv = static_cast<A>(xr[c]);
      if (!weightless || isfinite(xv)) d += xv * g;
    }
    d = mt::block_sum(d);  // ends with a barrier: safe to go on to the next token
    if (threadIdx.x == 0) dots[b * M + t - P] = d;
  }
}

template <typename S, typename A>
__global__ void __launch_bounds__(kThreads)
    backward_scores_kernel(const float* __restrict__ sizes, const int32_t* __restrict__ row_of,
                           const double* __restrict__ coef, const double* __restrict__ total,
                           const A* __restrict__ dots, int64_t N, int64_t P, int64_t M,
                           bool normalize, S* __restrict__ grad_scores) {
  const int64_t b = blockIdx.x;
  const int32_t* rrow = row_of + b * M;
  const double* crow = coef + b * M;
  const A* drow = dots + b * M;
  const float* zrow = sizes != nullptr ? sizes + b * N + P : nullptr;
  // In float64 like the weights (Note [Merge weights]); the dots are A sums.
  double fg = 0;
  if (normalize) {
    for (int64_t i = threadIdx.x; i < M; i += kThreads) {
      // Note [Zero coefficients]: as in the forward, a zero coefficient adds nothing.
      if (rrow[i] < 0 && crow[i] != 0.0) fg += crow[i] * static_cast<double>(drow[i]);
    }
    fg = mt::block_sum_all(fg);
  }
  const double W = total[b];
  for (int64_t i = threadIdx.x; i < M; i += kThreads) {
    double d = 0;
    if (rrow[i] < 0) {
      const double size = zrow != nullptr ? static_cast<double>(zrow[i]) : 1.0;
      const double dot = static_cast<double>(drow[i]);
      d = normalize ? (W != 0.0 ? size * (dot - fg) / W : 0.0) : size * dot;
    }
    grad_scores[b * M + i] = static_cast<S>(static_cast<A>(d));
  }
}

std::tuple<Tensor, Tensor> token_prune_merge_backward_cuda(
    const Tensor& grad_out, const Tensor& x_in, const Tensor& scores_in,
    const std::optional<Tensor>& sizes_in, const Tensor& kept_index,
    int64_t num_protected, bool normalize) {
  Tensor kept_t, grad_t;
  const TokenPruneMergeArgs a = validate_token_prune_merge_backward(
      grad_out, x_in, scores_in, sizes_in, kept_index, num_protected, kept_t, grad_t);
  const mt::TensorDeviceGuard guard(a.x);
  const cudaStream_t stream = mt::current_stream(a.x.get_device_index());
  const Device device = a.x.device();
  const int64_t B = a.batch, N = a.tokens, C = a.channels, P = a.protect, M = a.cand;
  const int64_t keep = a.keep, R = a.rows();
  Tensor grad_x = empty({B, N, C}, a.x.scalar_type(), device);
  Tensor grad_scores = empty({B, M}, a.scores.scalar_type(), device);
  if (B == 0) return {grad_x, grad_scores};
  check_launch_shape("token_prune_merge_backward", B);
  Tensor row_of = empty({B, M}, ScalarType::Int, device);
  const float* sizes = a.sizes.defined() ? a.sizes.const_data_ptr<float>() : nullptr;
  FAT_DISPATCH_TOKEN_TYPES(a.x.scalar_type(), "token_prune_merge_backward_cuda", [&] {
    using T = scalar_t;
    using A = opmath_t<T>;
    Tensor coef = empty({B, M}, ScalarType::Double, device);
    Tensor total = empty({B}, ScalarType::Double, device);
    Tensor dots = zeros({B, M}, tho::CppTypeToScalarType<A>::value, device);
    with_score_type<T>(a.scores.scalar_type(), [&](auto score_tag) {
      using S = decltype(score_tag);
      backward_prep_kernel<S, A><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          a.scores.const_data_ptr<S>(), sizes, kept_t.const_data_ptr<int64_t>(), N, P, M,
          keep, normalize, row_of.mutable_data_ptr<int32_t>(), coef.mutable_data_ptr<double>(),
          total.mutable_data_ptr<double>());
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (C > 0) {
      const dim3 grid(static_cast<unsigned>(B), grid_y(N));
      backward_rows_kernel<T, A><<<grid, kThreads, 0, stream>>>(
          grad_t.const_data_ptr<T>(), a.x.const_data_ptr<T>(), row_of.const_data_ptr<int32_t>(),
          coef.const_data_ptr<double>(), N, C, P, M, R, grad_x.mutable_data_ptr<T>(),
          dots.mutable_data_ptr<A>());
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    }
    with_score_type<T>(a.scores.scalar_type(), [&](auto score_tag) {
      using S = decltype(score_tag);
      backward_scores_kernel<S, A><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          sizes, row_of.const_data_ptr<int32_t>(), coef.const_data_ptr<double>(),
          total.const_data_ptr<double>(), dots.const_data_ptr<A>(), N, P, M, normalize,
          grad_scores.mutable_data_ptr<S>());
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_x, grad_scores};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fisheradaptune, CUDA, m) {
  m.impl("token_prune_merge", TORCH_BOX(&token_prune_merge_cuda));
  m.impl("token_prune_merge_backward", TORCH_BOX(&token_prune_merge_backward_cuda));
}

}  // namespace fisheradaptune
