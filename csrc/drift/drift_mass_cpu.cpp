// js_drift's mode "mass" on the CPU (docs/methods.md section 3), and the sharded mass ops
// js_mass_totals / js_mass_partial (its two halves, Note [Sharded drift] in drift/drift_math.h).
// Reductions are per chunk and then per group in plan order, so results do not depend on the
// thread count.
#include "common/stable.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "common/plan.h"
#include "common/simd.h"
#include "drift/drift.h"
#include "drift/drift_cpu.h"
#include "drift/drift_math.h"
#include "common/state.h"

namespace fisheradaptune {
namespace {

// kChunk and kBlock: Note [Chunk and block sizes] (common/plan.h).

// Natural log of x > 0 in double, branch-free so that it vectorises (Note [CPU vectorisation]):
// x = 2^e * m with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(t), t = (m-1)/(m+1), |t| < 0.172,
// by 11 odd terms (error below 1e-16 relative). Zero and subnormal inputs give a finite value
// about -709; callers multiply it by x, so their terms vanish.
__attribute__((always_inline)) inline double log_simd(double x) {
  const uint64_t bits = std::bit_cast<uint64_t>(x);
  // The exponent field as a double via 2^52 + k - 2^52: a vector int64->double conversion
  // made this loop 8x slower with AVX-512 (x >= 0, so the sign bit is clear).
  double e = std::bit_cast<double>((bits >> 52) | 0x4330000000000000ull) - 4503599627370496.0 -
             1023.0;
  double m = std::bit_cast<double>((bits & 0x000fffffffffffffull) | 0x3ff0000000000000ull);
  const bool big = m > 1.4142135623730951;
  m = big ? 0.5 * m : m;
  e = big ? e + 1.0 : e;
  const double t = (m - 1.0) / (m + 1.0), t2 = t * t;
  double poly = 1.0 / 23;
  poly = poly * t2 + 1.0 / 21; poly = poly * t2 + 1.0 / 19; poly = poly * t2 + 1.0 / 17;
  poly = poly * t2 + 1.0 / 15; poly = poly * t2 + 1.0 / 13; poly = poly * t2 + 1.0 / 11;
  poly = poly * t2 + 1.0 / 9;  poly = poly * t2 + 1.0 / 7;  poly = poly * t2 + 1.0 / 5;
  poly = poly * t2 + 1.0 / 3;  poly = poly * t2 + 1.0;
  return e * 0.6931471805599453 + 2.0 * t * poly;
}

// js_term (drift/drift_math.h, Note [JS term]) without branches or libm calls. Both helpers are
// always_inline: a call inside the cloned loop would stop it vectorising. For |d| < 1/8 the
// series f(d) = sum_k d^(2k) / (k (2k-1)) (9 terms, error below 1e-17 relative) avoids the
// cancellation of the log form; otherwise (1+d) ln(1+d) + (1-d) ln(1-d).
__attribute__((always_inline)) inline double js_term_simd(double p, double q) {
  const double s = p + q;
  const bool any = s > 0.0;
  const double d = any ? (p - q) / s : 0.0;
  const double u = d * d;
  double series = 1.0 / 153;
  series = series * u + 1.0 / 120; series = series * u + 1.0 / 91; series = series * u + 1.0 / 66;
  series = series * u + 1.0 / 45;  series = series * u + 1.0 / 28; series = series * u + 1.0 / 15;
  series = series * u + 1.0 / 6;   series = series * u + 1.0;
  series *= u;
  const double a = 1.0 + d, b = 1.0 - d;
  const double logs = a * log_simd(a) + b * log_simd(b);
  const double f = u < 1.0 / 64 ? series : logs;
  return any ? s * f * 0.25 : 0.0;
}

// Values read through StateIO (common/state.h): bfloat16 widened on the bits.
template <typename S>
__attribute__((always_inline)) inline double magnitude(typename StateIO<S>::storage v) {
  return std::abs(static_cast<double>(StateIO<S>::load(v)));
}

template <typename S>
FAT_CPU_CLONES void abs_sums(const S* x_s, const S* y_s, int64_t n, double& sx, double& sy) {
  using Stored = typename StateIO<S>::storage;
  const Stored* x = reinterpret_cast<const Stored*>(x_s);
  const Stored* y = reinterpret_cast<const Stored*>(y_s);
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    double ax = 0, ay = 0;
    FAT_SIMD_REDUCE(ax, ay)
    for (int64_t i = b; i < e; ++i) {
      ax += magnitude<S>(x[i]);
      ay += magnitude<S>(y[i]);
    }
    sx += ax;
    sy += ay;
  }
}

// p_i = (|x_i| * pc.pre) * pc.inv (Note [Tiny totals], drift/drift_math.h; pre is 1 for a normal
// total, and multiplying by it is exact).
template <typename S>
FAT_CPU_CLONES double js_sum(const S* x_s, const S* y_s, int64_t n, MassScale pc, MassScale pr) {
  using Stored = typename StateIO<S>::storage;
  const Stored* x = reinterpret_cast<const Stored*>(x_s);
  const Stored* y = reinterpret_cast<const Stored*>(y_s);
  const double cpre = pc.pre, cinv = pc.inv, rpre = pr.pre, rinv = pr.inv;
  double total = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    double acc = 0;
    FAT_SIMD_REDUCE(acc)
    for (int64_t i = b; i < e; ++i) {
      acc += js_term_simd((magnitude<S>(x[i]) * cpre) * cinv, (magnitude<S>(y[i]) * rpre) * rinv);
    }
    total += acc;
  }
  return total;
}

// Per chunk: sum |current| and sum |reference|.
template <typename S>
void mass_totals(const JsDriftArgs& a, const Plan& plan, std::vector<double>& tc,
                 std::vector<double>& tr) {
  const int64_t G = static_cast<int64_t>(tc.size());
  std::vector<double> pc(plan.chunks.size()), pr(plan.chunks.size());
  const std::vector<const S*> cur = const_ptrs<S>(a.current), ref = const_ptrs<S>(a.reference);
  st::parallel_for(0, static_cast<int64_t>(plan.chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Chunk& c = plan.chunks[k];
      const S* x = cur[c.tensor] + c.begin;
      const S* y = ref[c.tensor] + c.begin;
      double sx = 0, sy = 0;
      abs_sums(x, y, c.end - c.begin, sx, sy);
      pc[k] = sx;
      pr[k] = sy;
    }
  });
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t k = plan.group_offsets[g]; k < plan.group_offsets[g + 1]; ++k) {
      tc[g] += pc[plan.group_chunks[k]];
      tr[g] += pr[plan.group_chunks[k]];
    }
  }
}

// ref <- rho ref + (1 - rho) cur in T = opmath_t<S>: for bfloat16 state (Note [bfloat16
// state], common/state.h) the float32 arithmetic of float32 state, rounded once to
// bfloat16 on store; for float and double the casts are the identity.
template <typename S>
FAT_CPU_CLONES void ema_chunk(S* ref_s, const S* cur_s, int64_t n, opmath_t<S> rho) {
  using T = opmath_t<S>;
  using IO = StateIO<S>;  // branch-free bfloat16 conversions, so that the loop vectorises
  using Stored = typename IO::storage;
  Stored* ref = reinterpret_cast<Stored*>(ref_s);
  const Stored* cur = reinterpret_cast<const Stored*>(cur_s);
  FAT_SIMD
  for (int64_t i = 0; i < n; ++i) {
    ref[i] = IO::store(rho * IO::load(ref[i]) + (T(1) - rho) * IO::load(cur[i]));
  }
}

// Mass mode, second half: per group, the sum of js_term over the given elements with
// p_i = |c_i| * ic[g], q_i = |r_i| * ir[g] (groups with a zero total score 0). The reference update
// (if any) is fused into the scoring pass, after each element is read.
template <typename S>
void mass_partial(const JsDriftArgs& a, int64_t G, const double* tc, const double* tr,
                  std::optional<double> rho, double* out) {
  const Plan plan = make_plan(a.segments, a.numels, G, kChunk, /*cover_gaps=*/rho.has_value());
  std::vector<double> partial(plan.chunks.size(), 0.0);
  const std::vector<const S*> cur = const_ptrs<S>(a.current);
  // Write access to the reference only for an update; a read-only call reads it as const.
  const std::vector<S*> ref_out = rho ? mutable_ptrs<S>(a.reference) : std::vector<S*>();
  const std::vector<const S*> ref =
      rho ? std::vector<const S*>(ref_out.begin(), ref_out.end()) : const_ptrs<S>(a.reference);
  st::parallel_for(0, static_cast<int64_t>(plan.chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Chunk& c = plan.chunks[k];
      const int64_t n = c.end - c.begin;
      const S* x = cur[c.tensor] + c.begin;
      const S* y = ref[c.tensor] + c.begin;
      if (c.group >= 0 && tc[c.group] > 0 && tr[c.group] > 0) {
        partial[k] = js_sum(x, y, n, mass_scale(tc[c.group]), mass_scale(tr[c.group]));
      }
      if (rho) ema_chunk<S>(ref_out[c.tensor] + c.begin, x, n, static_cast<opmath_t<S>>(*rho));
    }
  });
  for (int64_t g = 0; g < G; ++g) {
    double s = 0;
    for (int64_t k = plan.group_offsets[g]; k < plan.group_offsets[g + 1]; ++k) {
      s += partial[plan.group_chunks[k]];
    }
    out[g] = s;
  }
}

// Mass mode: p_i = |c_i| / sum|c|, q_i = |r_i| / sum|r| over each group's elements: the two
// halves the sharded ops expose, then the distance.
template <typename S>
void mass_drift(const JsDriftArgs& a, int64_t G, std::optional<double> rho, bool base2,
                float* out) {
  const Plan scored = make_plan(a.segments, a.numels, G, kChunk, /*cover_gaps=*/false);
  std::vector<double> tc(G, 0.0), tr(G, 0.0), js(G, 0.0);
  mass_totals<S>(a, scored, tc, tr);
  mass_partial<S>(a, G, tc.data(), tr.data(), rho, js.data());
  for (int64_t g = 0; g < G; ++g) {
    out[g] = (tc[g] > 0 && tr[g] > 0) ? static_cast<float>(js_distance(js[g], base2)) : 0.f;
  }
}

Tensor js_mass_totals_cpu(const std::vector<Tensor>& current,
                          const std::vector<Tensor>& reference, const Tensor& segments,
                          int64_t num_groups) {
  const JsDriftArgs a = validate_js_mass("js_mass_totals", current, reference, segments,
                                         num_groups, std::nullopt, std::nullopt);
  Tensor out = zeros({2, num_groups}, ScalarType::Double, cpu_device());
  std::vector<double> tc(num_groups, 0.0), tr(num_groups, 0.0);
  FAT_DISPATCH_STATE_TYPES(state_dtype(a), "js_mass_totals_cpu", [&] {
    mass_totals<scalar_t>(a, make_plan(a.segments, a.numels, num_groups, kChunk, false), tc, tr);
  });
  double* o = out.mutable_data_ptr<double>();
  std::copy(tc.begin(), tc.end(), o);
  std::copy(tr.begin(), tr.end(), o + num_groups);
  return out;
}

Tensor js_mass_partial_cpu(const std::vector<Tensor>& current,
                           const std::vector<Tensor>& reference, const Tensor& segments,
                           int64_t num_groups, const Tensor& totals,
                           std::optional<double> update_reference) {
  const JsDriftArgs a = validate_js_mass("js_mass_partial", current, reference, segments,
                                         num_groups, totals, update_reference);
  const Tensor t = as_contiguous(totals);
  Tensor out = empty({num_groups}, ScalarType::Double, cpu_device());
  const double* tc = t.const_data_ptr<double>();
  double* o = out.mutable_data_ptr<double>();
  FAT_DISPATCH_STATE_TYPES(state_dtype(a), "js_mass_partial_cpu", [&] {
    mass_partial<scalar_t>(a, num_groups, tc, tc + num_groups, update_reference, o);
  });
  return out;
}

}  // namespace

void mass_drift_cpu(const JsDriftArgs& a, int64_t num_groups, std::optional<double> rho,
                    bool base2, float* out) {
  FAT_DISPATCH_STATE_TYPES(state_dtype(a), "js_drift_cpu", [&] {
    mass_drift<scalar_t>(a, num_groups, rho, base2, out);
  });
}

void update_reference_cpu(const JsDriftArgs& a, double rho) {
  FAT_DISPATCH_STATE_TYPES(state_dtype(a), "js_drift_cpu", [&] {
    const Plan all = make_plan({}, a.numels, 0, kChunk, /*cover_gaps=*/true);
    const auto r = static_cast<opmath_t<scalar_t>>(rho);
    const std::vector<const scalar_t*> cur = const_ptrs<scalar_t>(a.current);
    const std::vector<scalar_t*> ref = mutable_ptrs<scalar_t>(a.reference);
    st::parallel_for(0, static_cast<int64_t>(all.chunks.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const Chunk& c = all.chunks[k];
        ema_chunk<scalar_t>(ref[c.tensor] + c.begin, cur[c.tensor] + c.begin, c.end - c.begin,
                            r);
      }
    });
  });
}

STABLE_TORCH_LIBRARY_IMPL(fisheradaptune, CPU, m) {
  m.impl("js_mass_totals", TORCH_BOX(&js_mass_totals_cpu));
  m.impl("js_mass_partial", TORCH_BOX(&js_mass_partial_cpu));
}

}  // namespace fisheradaptune
