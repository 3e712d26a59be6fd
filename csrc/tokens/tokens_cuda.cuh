// What the token kernels (tokens/token_prune_merge_cuda.cu: token_prune_merge;
// tokens/bipartite_merge_cuda.cu: bipartite_merge) share on the device: the grid.y cap they stride
// beyond, and the selection order of both ops (its host twin: beats in common/simd.h). Their
// dtype dispatch is FAT_DISPATCH_TOKEN_TYPES (common/validate.h). Plain device code: no torch
// header.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fisheradaptune {
namespace tok {

// The largest grid.y; kernels that run rows / tokens / groups on grid.y stride beyond it.
constexpr int64_t kMaxGridY = 65535;

inline unsigned grid_y(int64_t rows) {
  return static_cast<unsigned>(std::min<int64_t>(rows, kMaxGridY));
}

// Selection order: higher first, NaN above every number (torch.sort's order), ties to the
// lower index; a total order, so selections are deterministic.
template <typename A>
__device__ __forceinline__ bool beats(A a, int64_t ia, A b, int64_t ib) {
  const bool na = isnan(a), nb = isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

// Note [Merge weights] (tokens/token_prune_merge.h): c * x for a float64 coefficient c in the
// accumulation type A: in A when c is a finite nonzero A value; otherwise (c rounds to 0 or
// overflows in A) in float64, rounded to A, so that inf * 3e-84 is inf, not 0 * inf. The branch
// depends on c only (uniform wherever c is).
template <typename A>
__device__ __forceinline__ bool fits_accumulation(double c) {
  const A w = static_cast<A>(c);
  return w != A(0) && isfinite(w);
}

template <typename A>
__device__ __forceinline__ A scaled(double c, bool fits, A x) {
  return fits ? static_cast<A>(c) * x : static_cast<A>(c * static_cast<double>(x));
}

}  // namespace tok
}  // namespace fisheradaptune
