// CUDA kernels of bipartite_merge and bipartite_merge_backward (ToMe; semantics: Note [Bipartite
// merge], csrc/tokens/bipartite_merge.h; CPU twin: csrc/tokens/bipartite_merge_cpu.cpp).
//
// Forward, up to four launches on the current stream:
//   1. normalise_kernel (r > 0 only), one warp per token, grid-striding over the B * N tokens
//      (grid capped at mt::kMaxGrid): the unit vector of the metric row in metric's opmath type,
//      scaled by the row's largest magnitude first; a zero row stays zero, a row with inf/NaN
//      becomes all NaN. Written to a [B, N, D] scratch.
//   2. match_kernel (r > 0 only), one warp per source (a non-protected A token: Note
//      [Bipartite merge]), kWarps of them per block: the dot with every destination (a
//      non-protected B token; lanes over D in increasing order, then a fixed xor-butterfly sum,
//      whose result is the same in every lane), keeping the best in the CPU's `beats` order
//      (higher first, NaN above every number, ties to the lower B index).
//   3. plan_kernel, one block per batch row: each A token's rank is the number of A tokens that
//      beat it (O(|A|^2 / kThreads) comparisons per thread, the best similarities in shared
//      memory when they fit), so it merges iff rank < r; a block scan in token order places the
//      unmerged ones; dest_index for every token. Then build_sources (shared with the backward):
//      the sources of every out row in increasing token order as CSR (per-row counts by integer
//      atomics, a block scan, then one warp places the tokens 32 at a time in token order), W per
//      out row summed in float64 by one thread in increasing token order, out_sizes = float(W),
//      and each source's coefficient (1 for a single-source row, s_i / W in float64, 0 when
//      W == 0).
//   4. rows_kernel, a block per (batch row, out row), grid-striding over the out rows: a
//      (16-byte vectorised when aligned) bitwise row copy for a single source, else a
//      per-channel sum of coef * x over the sources in increasing token order in x's opmath
//      type, zero coefficients skipped (Note [Zero coefficients],
//      csrc/tokens/token_prune_merge.h), one that underflows or overflows there applied in
//      float64 (Note [Merge weights]).
// Backward, two launches: prep (build_sources from dest_index and sizes, exactly as the forward,
// one block per batch row; out-of-range dest_index values are left out of counts and W) and rows
// (a block per token, grid-striding over the tokens: a copy of g[dest], coef * g[dest], or zeros
// for an out-of-range dest_index).
//
// Determinism: every value is produced by one thread (or one warp / block with a fixed reduction
// tree) in a fixed order; the only atomics are integer counts, whose result does not depend on
// their order. No float atomics: bitwise deterministic run to run. The merged rows may differ
// from the CPU's in the last bits (the similarity dots sum in another order, and the GPU fuses
// multiply-adds), so near-ties can match differently; dest_index agrees for generic inputs.
//
// Grid limits: batch rows run on grid.x (up to 2^31 - 1, checked here with the fake kernel's
// wording, fisheradaptune/ops/_checks.py _check_launch_shape); A-token groups, out rows and tokens run
// on grid.y, capped at kMaxGridY = 65535 blocks, beyond which each block takes every
// kMaxGridY-th one, so neither N nor the out row count is limited by the grid (token indices are
// int32: N < 2^31, checked for both backends by the shared validation).
//
// Instantiations: normalise_kernel over metric's dtype (4), match_kernel over its opmath type
// (float, double), rows kernels over x's (grad_out's) dtype (4); the plan kernels are untyped
// (similarities held as double, which represents both opmath types exactly).
#include "common/validate.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common/multi_tensor.cuh"
#include "tokens/bipartite_merge.h"
#include "tokens/tokens_cuda.cuh"

namespace fisheradaptune {
namespace {

using mt::copy_row;
using mt::kThreads;
using tok::beats;
using tok::grid_y;
using tok::kMaxGridY;
using mt::kWarps;

// Best similarities kept in shared memory per block (up to kMaxDynamicSmem, 32 KiB, so that with
// the scans' static shared memory a block stays under the 48 KiB that needs no opt-in: Note
// [Launch resources]); more A tokens read global memory.
constexpr int64_t kSmemBytes = mt::kMaxDynamicSmem;

// Elements of the A token's unit vector each lane keeps in registers (D <= 128 entirely); the
// rest is read from global memory, in the same order.
constexpr int kCache = 4;

constexpr unsigned kFullMask = 0xffffffffu;

// backward: what a token's gradient is.
constexpr uint8_t kZero = 0;   // dest_index out of range
constexpr uint8_t kCopy = 1;   // the sole source of its out row: g[dest], bitwise
constexpr uint8_t kScale = 2;  // coef * g[dest]

// Sum over the warp by a fixed xor butterfly. Each step adds the same two values in every lane
// of a pair (a + b and b + a are the same IEEE sum), so every lane ends with the same bits.
template <typename T>
__device__ __forceinline__ T warp_allsum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Maximum over the warp of finite values, in every lane.
template <typename T>
__device__ __forceinline__ T warp_allmax(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T u = __shfl_xor_sync(kFullMask, v, o);
    v = u > v ? u : v;
  }
  return v;
}

// Correctly rounded square roots (nvcc's default -prec-sqrt=true), as std::sqrt on the CPU.
__device__ __forceinline__ float root(float v) { return sqrtf(v); }
__device__ __forceinline__ double root(double v) { return ::sqrt(v); }

// ---------------------------------------------------------------------------------------------
// Forward: similarities and matching

// unit[t] = the unit vector of metric[t] (t over the B * N tokens), as `normalise` in the CPU
// twin: divided by the row's largest magnitude, then by the norm of the result; a zero row stays
// as it is (zeros), a row with inf or NaN becomes all NaN.
template <typename M, typename AM>
__global__ void __launch_bounds__(kThreads)
    normalise_kernel(const M* __restrict__ metric, int64_t count, int64_t D,
                     AM* __restrict__ unit) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // Warp-uniform loop: every lane of a warp has the same t, so the shuffles see the whole warp.
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp; t < count;
       t += static_cast<int64_t>(gridDim.x) * kWarps) {
    const M* m = metric + t * D;
    AM* u = unit + t * D;
    AM top = 0;
    bool bad = false;
    for (int64_t d = lane; d < D; d += 32) {
      const AM v = static_cast<AM>(m[d]);
      bad = bad || !isfinite(v);
      const AM mag = v < AM(0) ? -v : v;
      top = mag > top ? mag : top;
    }
    if (__any_sync(kFullMask, bad)) {
      for (int64_t d = lane; d < D; d += 32) u[d] = std::numeric_limits<AM>::quiet_NaN();
      continue;
    }
    top = warp_allmax(top);
    if (top == AM(0)) {
      for (int64_t d = lane; d < D; d += 32) u[d] = static_cast<AM>(m[d]);
      continue;
    }
    AM sq = 0;
    for (int64_t d = lane; d < D; d += 32) {
      const AM v = static_cast<AM>(m[d]) / top;
      sq += v * v;
    }
    const AM inv = AM(1) / root(warp_allsum(sq));
    for (int64_t d = lane; d < D; d += 32) u[d] = (static_cast<AM>(m[d]) / top) * inv;
  }
}

// best[b, k], match[b, k]: the best similarity of the k-th source (position first_a + 2k) of
// batch row b (as double, exact for both opmath types) and the index j within B' (position
// first_b + 2j) of its destination. Needs |B'| >= 1 (r > 0).
template <typename AM>
__global__ void __launch_bounds__(kThreads)
    match_kernel(const AM* __restrict__ unit, int64_t N, int64_t D, int64_t first_a,
                 int64_t first_b, int64_t na, int64_t nb, double* __restrict__ best,
                 int32_t* __restrict__ match) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.x;
  const AM* ub0 = unit + b * N * D;
  for (int64_t g = blockIdx.y; g * kWarps < na; g += gridDim.y) {
    const int64_t k = g * kWarps + warp;
    if (k >= na) continue;  // warp-uniform
    const AM* ua = ub0 + (first_a + 2 * k) * D;
    AM a_reg[kCache];
#pragma unroll
    for (int q = 0; q < kCache; ++q) {
      const int64_t d = lane + 32 * q;
      a_reg[q] = d < D ? ua[d] : AM(0);
    }
    AM top = 0;
    int32_t arg = -1;
    for (int64_t j = 0; j < nb; ++j) {
      const AM* ub = ub0 + (first_b + 2 * j) * D;
      // Lane partials over d = lane, lane + 32, ... in increasing order (registers first, then
      // global memory), then the fixed butterfly: the same order for every (k, j).
      AM s = 0;
#pragma unroll
      for (int q = 0; q < kCache; ++q) {
        const int64_t d = lane + 32 * q;
        if (d < D) s += a_reg[q] * ub[d];
      }
      for (int64_t d = lane + 32 * kCache; d < D; d += 32) s += ua[d] * ub[d];
      s = warp_allsum(s);
      // Every lane holds the same s, so every lane takes the same branch.
      if (arg < 0 || beats(s, j, top, static_cast<int64_t>(arg))) {
        top = s;
        arg = static_cast<int32_t>(j);
      }
    }
    if (lane == 0) {
      best[b * na + k] = static_cast<double>(top);
      match[b * na + k] = arg;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Out-row bookkeeping, shared by the forward (from the matching) and the backward (from
// dest_index); the whole block calls it, for one batch row:
//   off [R + 1]: CSR offsets of the out rows' sources; src [N]: the sources, each row's in
//   increasing token order; fill [R]: scratch. Tokens whose dest is outside [0, R) are left out.
//   coef [N] (per CSR slot, or null) and, for the backward, coef_tok/mode [N] (per token, or
//   null): 1 for a single-source row, s_i / W (float64) otherwise, 0 when W == 0.
//   out_sizes [R] (or null): float(W), W summed in float64 in increasing token order.
__device__ void build_sources(const int64_t* __restrict__ dest, const float* __restrict__ sz,
                              int64_t N, int64_t R, int32_t* __restrict__ off,
                              int32_t* __restrict__ fill, int32_t* __restrict__ src,
                              double* __restrict__ coef, float* __restrict__ out_sizes,
                              double* __restrict__ coef_tok, uint8_t* __restrict__ mode) {
  for (int64_t d = threadIdx.x; d <= R; d += kThreads) off[d] = 0;
  for (int64_t d = threadIdx.x; d < R; d += kThreads) fill[d] = 0;
  if (mode != nullptr) {
    for (int64_t i = threadIdx.x; i < N; i += kThreads) mode[i] = kZero;
  }
  __syncthreads();
  // Counts: integer atomics, exact whatever their order.
  for (int64_t i = threadIdx.x; i < N; i += kThreads) {
    const int64_t d = dest[i];
    if (0 <= d && d < R) atomicAdd(off + d + 1, 1);
  }
  __syncthreads();
  // Inclusive scan of off[1..R] in row order, kThreads rows at a time (each thread rewrites the
  // entry it read; the totals <= N fit int32).
  int32_t carry = 0;
  for (int64_t base = 0; base < R; base += kThreads) {
    const int64_t d = base + threadIdx.x;
    const int32_t v = d < R ? off[d + 1] : 0;
    const int32_t before = mt::block_exclusive_scan(v);
    if (d < R) off[d + 1] = carry + before + v;
    carry += mt::block_sum_all(v);
  }
  __syncthreads();
  // Placement in increasing token order: warp 0 takes 32 tokens at a time; a token's slot is its
  // row's offset, plus the tokens of that row placed in earlier rounds (fill), plus those of
  // lower lanes in this round. The last lane of a row's group then advances fill.
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    for (int64_t base = 0; base < N; base += 32) {
      const int64_t i = base + lane;
      int32_t d = -1;
      if (i < N) {
        const int64_t di = dest[i];
        if (0 <= di && di < R) d = static_cast<int32_t>(di);
      }
      int32_t rank = 0;
      bool last = true;
#pragma unroll
      for (int l = 0; l < 32; ++l) {
        const int32_t dl = __shfl_sync(kFullMask, d, l);
        if (dl == d) {
          if (l < lane) ++rank;
          if (l > lane) last = false;
        }
      }
      if (d >= 0) src[off[d] + fill[d] + rank] = static_cast<int32_t>(i);
      __syncwarp();
      if (d >= 0 && last) fill[d] += rank + 1;
      __syncwarp();
    }
  }
  __syncthreads();
  // W and the coefficients: one thread per out row, sources in increasing token order.
  for (int64_t d = threadIdx.x; d < R; d += kThreads) {
    const int32_t s0 = off[d], s1 = off[d + 1];
    double w = 0;
    for (int32_t s = s0; s < s1; ++s) w += sz != nullptr ? static_cast<double>(sz[src[s]]) : 1.0;
    const bool single = s1 - s0 == 1;
    for (int32_t s = s0; s < s1; ++s) {
      const double si = sz != nullptr ? static_cast<double>(sz[src[s]]) : 1.0;
      const double c = single ? 1.0 : (w != 0 ? si / w : 0.0);
      if (coef != nullptr) coef[s] = c;
      if (mode != nullptr) {
        coef_tok[src[s]] = c;
        mode[src[s]] = single ? kCopy : kScale;
      }
    }
    if (out_sizes != nullptr) out_sizes[d] = static_cast<float>(w);
  }
}

// One block per batch row: the matching (which A tokens merge), dest_index, and build_sources.
__global__ void __launch_bounds__(kThreads)
    plan_kernel(const double* __restrict__ best, const int32_t* __restrict__ match,
                const float* __restrict__ sizes, int64_t N, int64_t P, int64_t first_a,
                int64_t first_b, int64_t na, int64_t nb, int64_t r, bool use_smem,
                int64_t* __restrict__ dest, int32_t* __restrict__ off, int32_t* __restrict__ fill,
                int32_t* __restrict__ src, double* __restrict__ coef,
                float* __restrict__ out_sizes) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  double* smem = reinterpret_cast<double*>(smem_raw);
  const int64_t b = blockIdx.x;
  const int64_t R = N - r;
  const double* brow = r > 0 ? best + b * na : nullptr;
  const int32_t* mrow = r > 0 ? match + b * na : nullptr;
  if (use_smem) {
    for (int64_t k = threadIdx.x; k < na; k += kThreads) smem[k] = brow[k];
    __syncthreads();
  }
  const double* sb = use_smem ? smem : brow;
  int64_t* db = dest + b * N;
  const int64_t row_b = P + na - r;  // the out row of the first B' token
  for (int64_t i = threadIdx.x; i < P; i += kThreads) db[i] = i;
  for (int64_t j = threadIdx.x; j < nb; j += kThreads) db[first_b + 2 * j] = row_b + j;
  int64_t unmerged_before = 0;  // unmerged A tokens in earlier chunks (uniform over the block)
  for (int64_t base = 0; base < na; base += kThreads) {
    const int64_t k = base + threadIdx.x;
    bool merged = false;
    if (k < na && r > 0) {
      const double bk = sb[k];
      int64_t rank = 0;
      for (int64_t j = 0; j < na && rank < r; ++j) rank += beats(sb[j], j, bk, k) ? 1 : 0;
      merged = rank < r;
    }
    const int32_t flag = k < na && !merged ? 1 : 0;
    const int32_t pos = mt::block_exclusive_scan(flag);
    if (k < na) db[first_a + 2 * k] = merged ? row_b + mrow[k] : P + unmerged_before + pos;
    unmerged_before += mt::block_sum_all(flag);
  }
  __syncthreads();  // dest written by other threads of this block: visible after the barrier
  build_sources(db, sizes != nullptr ? sizes + b * N : nullptr, N, R, off + b * (R + 1),
                fill + b * R, src + b * N, coef + b * N, out_sizes + b * R, nullptr, nullptr);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    rows_kernel(const T* __restrict__ x, const int32_t* __restrict__ off,
                const int32_t* __restrict__ src, const double* __restrict__ coef, int64_t N,
                int64_t R, int64_t C, T* __restrict__ out) {
  const int64_t b = blockIdx.x;
  const T* xb = x + b * N * C;
  const int32_t* ob = off + b * (R + 1);
  const int32_t* sb = src + b * N;
  const double* cb = coef + b * N;
  // Grid-stride over the out rows (uniform per block: no barrier inside).
  for (int64_t d = blockIdx.y; d < R; d += gridDim.y) {
    T* orow = out + (b * R + d) * C;
    const int32_t s0 = ob[d], s1 = ob[d + 1];
    if (s1 - s0 == 1) {
      copy_row(orow, xb + static_cast<int64_t>(sb[s0]) * C, C);
      continue;
    }
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      A acc = 0;
      for (int32_t s = s0; s < s1; ++s) {
        // Note [Zero coefficients] (tokens/token_prune_merge.h): a zero coefficient (in float64)
        // adds nothing, even for an inf/NaN token; any other takes part, also one that underflows
        // in A (Note [Merge weights]). Uniform over the block (same s for every thread).
        const double w = cb[s];
        if (w == 0.0) continue;
        acc += tok::scaled<A>(w, tok::fits_accumulation<A>(w),
                              static_cast<A>(xb[static_cast<int64_t>(sb[s]) * C + c]));
      }
      orow[c] = static_cast<T>(acc);
    }
  }
}

// The launch shape's own limits, with the fake kernel's wording (_check_launch_shape in
// fisheradaptune/ops/_checks.py): one block per batch row on grid.x; tokens as int32 (also checked by
// the shared validation).
void check_launch_shape(const char* op, int64_t B, int64_t N) {
  FAT_CHECK_VALUE(B <= std::numeric_limits<int32_t>::max(), op, "x",
                  "at most 2^31 - 1 batch rows on CUDA, got ", B);
  FAT_CHECK_VALUE(N <= std::numeric_limits<int32_t>::max(), op, "x",
                  "at most 2^31 - 1 tokens on CUDA, got ", N);
}

std::tuple<Tensor, Tensor, Tensor> bipartite_merge_cuda(
    const Tensor& x_in, const Tensor& metric_in, const std::optional<Tensor>& sizes_in,
    int64_t num_protected, int64_t r) {
  const BipartiteMergeArgs a = validate_bipartite_merge(x_in, metric_in, sizes_in, num_protected, r);
  const mt::TensorDeviceGuard guard(a.x);
  const cudaStream_t stream = mt::current_stream(a.x.get_device_index());
  const Device device = a.x.device();
  const int64_t B = a.batch, N = a.tokens, C = a.channels, D = a.dims, P = a.protect;
  const int64_t R = a.rows(), na = a.set_a, nb = a.set_b;
  const int64_t first_a = a.first_a, first_b = a.first_b;
  Tensor out = empty({B, R, C}, a.x.scalar_type(), device);
  Tensor out_sizes = empty({B, R}, ScalarType::Float, device);
  Tensor dest_index = empty({B, N}, ScalarType::Long, device);
  if (B == 0) return {out, out_sizes, dest_index};
  check_launch_shape("bipartite_merge", B, N);
  if (N == 0) return {out, out_sizes, dest_index};

  // Launches 1-2.
  Tensor best, match;
  if (r > 0) {
    best = empty({B, na}, ScalarType::Double, device);
    match = empty({B, na}, ScalarType::Int, device);
    FAT_DISPATCH_TOKEN_TYPES(a.metric.scalar_type(), "bipartite_merge_match_cuda", [&] {
      using M = scalar_t;
      using AM = opmath_t<M>;
      Tensor unit = empty({B, N, D}, tho::CppTypeToScalarType<AM>::value, device);
      if (D > 0) {
        const int64_t blocks = (B * N + kWarps - 1) / kWarps;
        normalise_kernel<M, AM><<<mt::grid_for(blocks), kThreads, 0, stream>>>(
            a.metric.const_data_ptr<M>(), B * N, D, unit.mutable_data_ptr<AM>());
        STD_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const dim3 grid(static_cast<unsigned>(B), grid_y((na + kWarps - 1) / kWarps));
      match_kernel<AM><<<grid, kThreads, 0, stream>>>(
          unit.const_data_ptr<AM>(), N, D, first_a, first_b, na, nb,
          best.mutable_data_ptr<double>(), match.mutable_data_ptr<int32_t>());
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  // Launch 3.
  Tensor off = empty({B, R + 1}, ScalarType::Int, device);
  Tensor fill = empty({B, R}, ScalarType::Int, device);
  Tensor src = empty({B, N}, ScalarType::Int, device);
  Tensor coef = empty({B, N}, ScalarType::Double, device);
  const float* sizes = a.sizes.defined() ? a.sizes.const_data_ptr<float>() : nullptr;
  const bool use_smem = r > 0 && na * static_cast<int64_t>(sizeof(double)) <= kSmemBytes;
  const size_t smem = use_smem ? static_cast<size_t>(na) * sizeof(double) : 0;
  plan_kernel<<<static_cast<unsigned>(B), kThreads, smem, stream>>>(
      r > 0 ? best.const_data_ptr<double>() : nullptr,
      r > 0 ? match.const_data_ptr<int32_t>() : nullptr, sizes, N, P, first_a, first_b, na, nb,
      r, use_smem, dest_index.mutable_data_ptr<int64_t>(), off.mutable_data_ptr<int32_t>(),
      fill.mutable_data_ptr<int32_t>(), src.mutable_data_ptr<int32_t>(),
      coef.mutable_data_ptr<double>(), out_sizes.mutable_data_ptr<float>());
  STD_CUDA_KERNEL_LAUNCH_CHECK();

  // Launch 4.
  if (C > 0) {
    FAT_DISPATCH_TOKEN_TYPES(a.x.scalar_type(), "bipartite_merge_cuda", [&] {
      using T = scalar_t;
      using A = opmath_t<T>;
      const dim3 grid(static_cast<unsigned>(B), grid_y(R));
      rows_kernel<T, A><<<grid, kThreads, 0, stream>>>(
          a.x.const_data_ptr<T>(), off.const_data_ptr<int32_t>(), src.const_data_ptr<int32_t>(),
          coef.const_data_ptr<double>(), N, R, C, out.mutable_data_ptr<T>());
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {out, out_sizes, dest_index};
}

// ---------------------------------------------------------------------------------------------
// Backward

// One block per batch row: the forward's bookkeeping from dest_index and sizes; coef_tok and
// mode per token.
__global__ void __launch_bounds__(kThreads)
    backward_prep_kernel(const int64_t* __restrict__ dest, const float* __restrict__ sizes,
                         int64_t N, int64_t R, int32_t* __restrict__ off,
                         int32_t* __restrict__ fill, int32_t* __restrict__ src,
                         double* __restrict__ coef_tok, uint8_t* __restrict__ mode) {
  const int64_t b = blockIdx.x;
  build_sources(dest + b * N, sizes != nullptr ? sizes + b * N : nullptr, N, R,
                off + b * (R + 1), fill + b * R, src + b * N, nullptr, nullptr,
                coef_tok + b * N, mode + b * N);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    backward_rows_kernel(const T* __restrict__ grad_out, const int64_t* __restrict__ dest,
                         const double* __restrict__ coef_tok, const uint8_t* __restrict__ mode,
                         int64_t N, int64_t R, int64_t C, T* __restrict__ grad_x) {
  const int64_t b = blockIdx.x;
  // Grid-stride over the tokens (uniform per block: no barrier inside).
  for (int64_t t = blockIdx.y; t < N; t += gridDim.y) {
    const int64_t i = b * N + t;
    T* dst = grad_x + i * C;
    const uint8_t m = mode[i];
    if (m == kZero) {  // dest_index out of range: nothing of grad_out is read
      for (int64_t c = threadIdx.x; c < C; c += kThreads) dst[c] = T(0);
      continue;
    }
    const T* row = grad_out + (b * R + dest[i]) * C;  // in [0, R): checked by the prep kernel
    if (m == kCopy) {
      copy_row(dst, row, C);
      continue;
    }
    // As the CPU twin: every channel is scaled, a zero coefficient included; one that
    // underflows or overflows in A in float64 (Note [Merge weights]).
    const double w = coef_tok[i];
    const bool fits = w == 0.0 || tok::fits_accumulation<A>(w);
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      dst[c] = static_cast<T>(tok::scaled<A>(w, fits, static_cast<A>(row[c])));
    }
  }
}

Tensor bipartite_merge_backward_cuda(const Tensor& grad_out,
                                     const std::optional<Tensor>& sizes_in,
                                     const Tensor& dest_index) {
  const BipartiteMergeArgs a = validate_bipartite_merge_backward(grad_out, sizes_in, dest_index);
  const mt::TensorDeviceGuard guard(a.grad);
  const cudaStream_t stream = mt::current_stream(a.grad.get_device_index());
  const Device device = a.grad.device();
  const int64_t B = a.batch, N = a.tokens, C = a.channels, R = a.rows();
  Tensor grad_x = empty({B, N, C}, a.grad.scalar_type(), device);
  if (B == 0) return grad_x;
  check_launch_shape("bipartite_merge_backward", B, N);
  if (N == 0 || C == 0) return grad_x;
  Tensor off = empty({B, R + 1}, ScalarType::Int, device);
  Tensor fill = empty({B, R}, ScalarType::Int, device);
  Tensor src = empty({B, N}, ScalarType::Int, device);
  Tensor coef_tok = empty({B, N}, ScalarType::Double, device);
  Tensor mode = empty({B, N}, ScalarType::Byte, device);
  const float* sizes = a.sizes.defined() ? a.sizes.const_data_ptr<float>() : nullptr;
  backward_prep_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
      a.dest.const_data_ptr<int64_t>(), sizes, N, R, off.mutable_data_ptr<int32_t>(),
      fill.mutable_data_ptr<int32_t>(), src.mutable_data_ptr<int32_t>(),
      coef_tok.mutable_data_ptr<double>(), mode.mutable_data_ptr<uint8_t>());
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  FAT_DISPATCH_TOKEN_TYPES(a.grad.scalar_type(), "bipartite_merge_backward_cuda", [&] {
    using T = scalar_t;
    using A = opmath_t<T>;
    const dim3 grid(static_cast<unsigned>(B), grid_y(N));
    backward_rows_kernel<T, A><<<grid, kThreads, 0, stream>>>(
        a.grad.const_data_ptr<T>(), a.dest.const_data_ptr<int64_t>(),
        coef_tok.const_data_ptr<double>(), mode.const_data_ptr<uint8_t>(), N, R, C,
        grad_x.mutable_data_ptr<T>());
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fisheradaptune, CUDA, m) {
  m.impl("bipartite_merge", TORCH_BOX(&bipartite_merge_cuda));
  m.impl("bipartite_merge_backward", TORCH_BOX(&bipartite_merge_backward_cuda));
}

}  // namespace fisheradaptune
