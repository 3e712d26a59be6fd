// Scalar pieces of the JS distance shared by the CPU and CUDA kernels (host and device).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FAT_HD __host__ __device__ __forceinline__
#else
#define FAT_HD inline
#endif

// Note [Uncontracted arithmetic]
// The CPU build uses -ffp-contract=off; nvcc contracts a * b + c into an fma by default
// (--fmad=true). Where a helper below must round exactly as on the CPU, its products and sums
// go through these: __dmul_rn / __dadd_rn / __dsub_rn are never contracted by nvcc, and on the
// host they are the plain operators (compiled without contraction).
#if defined(__CUDA_ARCH__)
#define FAT_DMUL(a, b) __dmul_rn((a), (b))
#define FAT_DADD(a, b) __dadd_rn((a), (b))
#define FAT_DSUB(a, b) __dsub_rn((a), (b))
#else
#define FAT_DMUL(a, b) ((a) * (b))
#define FAT_DADD(a, b) ((a) + (b))
#define FAT_DSUB(a, b) ((a) - (b))
#endif

namespace fisheradaptune {

// Note [JS term]: with s = p + q and d = (p - q) / s,
//   p log(2p / s) + q log(2q / s) = s/2 * f(d),  f(d) = (1+d) log1p(d) + (1-d) log1p(-d),
// so JS^2 = 0.5 (KL(p||m) + KL(q||m)) = sum_i s_i f(d_i) / 4. Unlike the textbook form, f(d)
// has no cancellation when p ~ q (f(d) ~ d^2), which is exactly the regime of settled groups.
// A zero p_i (d = -1) contributes nothing for p (0 log 0 = 0; docs/methods.md section 3).
// Not CPU-identical on the device (nvcc may contract it, and the device's log1p is not glibc's);
// the CPU's mass mode uses its own vectorised form (drift/drift_mass_cpu.cpp js_term_simd) anyway,
// so JS distances agree across backends to rounding, not bitwise.
template <typename T>
FAT_HD T js_term(T p, T q) {
  const T s = p + q;
  if (!(s > T(0))) return T(0);
  const T d = (p - q) / s;
  const T a = d <= T(-1) ? T(0) : (T(1) + d) * log1p(d);
  const T b = d >= T(1) ? T(0) : (T(1) - d) * log1p(-d);
  return s * (a + b) * T(0.25);
}

// Note [Sharded drift]: the mass distance of a group is sqrt(sum_i js_term(|c_i|/C, |r_i|/R))
// with C = sum|c|, R = sum|r| over the group. Both sums add over any split of the group's
// elements, so a group whose elements are spread over ranks (FSDP shards) is scored exactly by
// all-reducing the totals, then all-reducing the js_term sums computed with the global totals,
// then taking the root: ops js_mass_totals and js_mass_partial are those two halves.
//
// Note [Tiny totals]
// Kernels form p_i = |c_i| / C as |c_i| * (1 / C), a multiply in the vectorised loop. A total
// below ~5.6e-309 (a float64 group of subnormal values, or a tiny total handed to
// js_mass_partial) makes 1 / C overflow to inf: every p_i became inf or NaN (0 * inf), and the
// group read as settled (0) or NaN, where the reference divides and scores it. A total below
// DBL_MIN (subnormal) is therefore scaled with its elements by 2^54, exactly (a power of two):
// C * 2^54 >= 2^-1020 is normal, 1 / (C * 2^54) is finite, and
//   p_i = (|c_i| * 2^54) * (1 / (C * 2^54)),
// rounded as a normal total's p_i (mass mode is then invariant, bitwise, under scaling by a
// power of two, also into the subnormal range). For C >= DBL_MIN the scale is 1: bitwise the
// plain |c_i| * (1 / C). Shared by both backends.
struct MassScale {
  double pre;  // 1, or 2^54 for a subnormal total
  double inv;  // 1 / (C * pre)
  FAT_HD double of(double magnitude) const { return (magnitude * pre) * inv; }
};

FAT_HD MassScale mass_scale(double total) {
  constexpr double kMinNormal = 2.2250738585072014e-308;  // DBL_MIN
  constexpr double kUp = 18014398509481984.0;             // 2^54
  return total >= kMinNormal ? MassScale{1.0, 1.0 / total}
                             : MassScale{kUp, 1.0 / (total * kUp)};
}

// JS^2 (in nats) -> distance, in nats or bits.
FAT_HD double js_distance(double js_sq, bool base2) {
  const double v = js_sq > 0 ? js_sq : 0.0;
  return base2 ? sqrt(v / 0.69314718055994530942) : sqrt(v);
}

// numpy.quantile's default ("linear") interpolation between order statistics a <= b. Rounded as
// on the CPU on both backends (Note [Uncontracted arithmetic]).
FAT_HD double lerp_numpy(double a, double b, double t) {
  const double diff = b - a;
  return t >= 0.5 ? FAT_DSUB(b, FAT_DMUL(diff, 1.0 - t)) : FAT_DADD(a, FAT_DMUL(diff, t));
}

// Note [Histogram range]
// The bin range [lo, hi] of a group (docs/methods.md section 3): hi is raised to
// lo + min_log_range when the quantiles are closer than min_log_range. When min_log_range is
// below half an ulp of lo (values near 10 have lo ~ 1, ulp 2.2e-16), lo + min_log_range rounds
// back to lo: the range would be empty and bin_of would divide by zero (every value NaN, the
// distance silently 0). hi is then the next double above lo, the narrowest non-empty range, so
// values equal to lo fall in the first bin and values equal to hi in the last. Shared by both
// backends and mirrored by fisheradaptune.reference.js_drift.
FAT_HD double histogram_hi(double lo, double hi, double min_log_range) {
  if (hi - lo < min_log_range) hi = lo + min_log_range;
  if (!(hi > lo)) hi = nextafter(lo, static_cast<double>(INFINITY));
  return hi;
}

// The histogram mode's transform of a Fisher value (docs/methods.md section 3).
FAT_HD double log_magnitude(double x) { return log10(fabs(x) + 1e-12); }

// Bin of v in `bins` equal bins over [lo, hi]; -1 outside. hi itself falls in the last bin, as
// in numpy.histogram.
FAT_HD int64_t bin_of(double v, double lo, double hi, int64_t bins) {
  if (!(v >= lo && v <= hi)) return -1;
  const double x = (v - lo) * (static_cast<double>(bins) / (hi - lo));
  if (!(x >= 0)) return -1;  // NaN when an infinite range meets an infinite value
  int64_t b = static_cast<int64_t>(x);
  return b >= bins ? bins - 1 : b;
}

}  // namespace fisheradaptune
