// Portable vectorisation for the CPU kernels.
//
// Note [CPU vectorisation]: ATen's Vectorized<T> is only fast when a file is compiled once per
// CPU capability with matching flags, which a setuptools extension cannot do per file; without
// them it falls back to generic code that does not vectorise. Instead, hot loops are plain
// `#pragma omp simd` loops in functions marked FAT_CPU_CLONES: GCC compiles each for AVX-512,
// AVX2+FMA and baseline x86-64, and the loader picks one for the running CPU (ifunc). Results
// are deterministic on a given machine; the lane count, and so the order of float additions
// inside a block, can differ between machines.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/plan.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
// ISA levels, not CPU models: an "arch=<model>" clone is chosen by CPU model, so an AMD CPU with
// AVX-512 would silently run the baseline clone. x86-64-v4 is AVX-512 (F/BW/CD/DQ/VL),
// x86-64-v3 is AVX2 + FMA.
#define FAT_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FAT_CPU_CLONES
#endif

#define FAT_PRAGMA(x) _Pragma(#x)
#define FAT_SIMD_REDUCE(...) FAT_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#define FAT_SIMD FAT_PRAGMA(omp simd)

namespace fisheradaptune {

// sum_i x[i] * y[i], inputs read as A: A-lanes within blocks of kBlock elements (vectorised;
// Note [Chunk and block sizes], plan.h), blocks added in double so long rows keep their
// precision. Deterministic on a given machine.
template <typename T, typename A>
FAT_CPU_CLONES A blocked_dot(const T* __restrict x, const T* __restrict y, int64_t n) {
  double total = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    A acc = 0;
    FAT_SIMD_REDUCE(acc)
    for (int64_t i = b; i < e; ++i) acc += static_cast<A>(x[i]) * static_cast<A>(y[i]);
    total += static_cast<double>(acc);
  }
  return static_cast<A>(total);
}

// Selection order of the token ops (token_prune_merge's scores, bipartite_merge's
// similarities): higher first, NaN above every number (torch.sort's order), ties to the lower
// index; a total order, so selections are deterministic.
template <typename A>
inline bool beats(A a, int64_t ia, A b, int64_t ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

// Row helpers of the token kernels (inputs T, accumulation A): acc += w * x, out = acc, and
// out = w * g.
template <typename T, typename A>
FAT_CPU_CLONES void axpy(A* __restrict acc, const T* __restrict x, A w, int64_t n) {
  FAT_SIMD
  for (int64_t i = 0; i < n; ++i) acc[i] += w * static_cast<A>(x[i]);
}

template <typename T, typename A>
FAT_CPU_CLONES void store(T* __restrict out, const A* __restrict acc, int64_t n) {
  FAT_SIMD
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(acc[i]);
}

template <typename T, typename A>
FAT_CPU_CLONES void scale_row(T* __restrict out, const T* __restrict g, A w, int64_t n) {
  FAT_SIMD
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(w * static_cast<A>(g[i]));
}

// Note [Merge weights] (tokens/token_prune_merge.h): a token's float64 coefficient c is applied in
// A when it is a finite nonzero A value (the vectorised rows above); one that rounds to 0 or
// overflows in A (float32: below 1.4e-45 or above 3.4e38) has its products formed in float64 and
// rounded to A, so that an inf or NaN value of a token that weighs something propagates as in
// float64 (inf * 3e-84 = inf) instead of being hidden by a coefficient of exactly 0. Rare (extreme
// sizes or scores), hence the plain loop.
template <typename A>
inline bool fits_accumulation(double c) {
  const A w = static_cast<A>(c);
  return w != A(0) && std::isfinite(w);
}

// acc += c * x (c != 0; a zero coefficient is skipped by the callers: Note [Zero coefficients]).
template <typename T, typename A>
inline void axpy_coef(A* __restrict acc, const T* __restrict x, double c, int64_t n) {
  if (fits_accumulation<A>(c)) {
    axpy<T, A>(acc, x, static_cast<A>(c), n);
    return;
  }
  for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<A>(c * static_cast<double>(x[i]));
}

// out = c * g (c == 0 included: every channel is scaled, 0 * inf being NaN as in the reference's
// gradient).
template <typename T, typename A>
inline void scale_coef(T* __restrict out, const T* __restrict g, double c, int64_t n) {
  if (c == 0.0 || fits_accumulation<A>(c)) {
    scale_row<T, A>(out, g, static_cast<A>(c), n);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<T>(static_cast<A>(c * static_cast<double>(g[i])));
  }
}

}  // namespace fisheradaptune
