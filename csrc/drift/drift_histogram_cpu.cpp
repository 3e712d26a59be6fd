// js_drift's mode "histogram" on the CPU (docs/methods.md section 3): per group, percentiles of
// the union of both snapshots' log-magnitudes give the bin range, then both snapshots are binned
// and the JS distance of the two histograms taken. One group per task, so results do not depend
// on the thread count. Called by js_drift's CPU kernel (drift_cpu.cpp).
#include "common/stable.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/plan.h"
#include "drift/drift.h"
#include "drift/drift_cpu.h"
#include "drift/drift_math.h"
#include "common/state.h"

namespace fisheradaptune {
namespace {

// The k-th smallest of v (0-based), after which v[k+1:] holds the larger values.
template <typename S>
double order_stat(std::vector<S>& v, int64_t k) {
  std::nth_element(v.begin(), v.begin() + k, v.end());
  return v[k];
}

// numpy.quantile(log_magnitude(values), q) with linear interpolation. log_magnitude is
// monotone, so order statistics are taken on |x| and transformed afterwards.
// Values are kept in the state's own dtype: rounding them would move a quantile that falls
// on a data value, and the extreme elements would then be binned outside [lo, hi].
template <typename S>
double log_quantile(std::vector<S>& absval, double q) {
  const int64_t n = static_cast<int64_t>(absval.size());
  const double h = static_cast<double>(n - 1) * q;
  const int64_t i = static_cast<int64_t>(std::floor(h));
  const double a = log_magnitude(order_stat(absval, i));
  if (i + 1 >= n) return a;
  const double b = log_magnitude(*std::min_element(absval.begin() + i + 1, absval.end()));
  return lerp_numpy(a, b, h - static_cast<double>(i));
}

// Note [Sparse histogram]
// Dense count arrays cost 16 bytes per bin per thread, and bins may be up to 2^30 (kMaxBins):
// 32 GiB for two threads. Above kDenseBins bins a group's histogram is built from the sorted
// bin indices of its in-range values instead (memory O(values), time O(values log values)): the
// occupied bins in increasing order, then all empty bins at once, each of which contributes
// js_term(1e-12 / nc, 1e-12 / nr). nc = (values in range) + bins * 1e-12, the same sum as the
// dense loop's up to its rounding (which adds 1e-12 bin by bin), so results agree with the dense
// form and the reference to rounding, not bitwise.
constexpr int64_t kDenseBins = int64_t(1) << 16;

template <typename S>
double sparse_histogram_js(const std::vector<const S*>& cur, const std::vector<const S*>& ref,
                           const std::vector<Segment>& segs, double lo, double hi, int64_t bins,
                           std::vector<int64_t>& ic, std::vector<int64_t>& ir) {
  ic.clear();
  ir.clear();
  for (const Segment& s : segs) {
    const S* x = cur[s.tensor];
    const S* y = ref[s.tensor];
    for (int64_t i = s.begin; i < s.end; ++i) {
      const int64_t bx = bin_of(log_magnitude(static_cast<double>(x[i])), lo, hi, bins);
      const int64_t by = bin_of(log_magnitude(static_cast<double>(y[i])), lo, hi, bins);
      if (bx >= 0) ic.push_back(bx);
      if (by >= 0) ir.push_back(by);
    }
  }
  std::sort(ic.begin(), ic.end());
  std::sort(ir.begin(), ir.end());
  const double nc = static_cast<double>(ic.size()) + static_cast<double>(bins) * 1e-12;
  const double nr = static_cast<double>(ir.size()) + static_cast<double>(bins) * 1e-12;
  double js = 0;
  int64_t occupied = 0;
  size_t i = 0, j = 0;
  while (i < ic.size() || j < ir.size()) {
    const int64_t b = j == ir.size() || (i < ic.size() && ic[i] < ir[j]) ? ic[i] : ir[j];
    double hc = 0, hr = 0;
    for (; i < ic.size() && ic[i] == b; ++i) hc += 1.0;
    for (; j < ir.size() && ir[j] == b; ++j) hr += 1.0;
    js += js_term<double>((hc + 1e-12) / nc, (hr + 1e-12) / nr);
    ++occupied;
  }
  const double empty = static_cast<double>(bins - occupied);
  return js + empty * js_term<double>(1e-12 / nc, 1e-12 / nr);
}

// Histogram mode (the paper's), one group at a time: percentiles of the union of both
// snapshots' log-magnitudes give the bin range, then both snapshots are binned.
template <typename S>
void histogram_drift(const JsDriftArgs& a, int64_t G, int64_t bins, double lower_q,
                     double upper_q, double min_log_range, bool base2, float* out) {
  std::vector<std::vector<Segment>> by_group(G);
  for (const Segment& s : a.segments) by_group[s.group].push_back(s);
  // Note [Sparse histogram]: dense count arrays up to kDenseBins bins.
  const bool dense = bins <= kDenseBins;
  const std::vector<const S*> cur = const_ptrs<S>(a.current), ref = const_ptrs<S>(a.reference);
  st::parallel_for(0, G, 1, [&](int64_t glo, int64_t ghi) {
    std::vector<S> absval;
    std::vector<double> hc(dense ? bins : 0), hr(dense ? bins : 0);
    std::vector<int64_t> ic, ir;  // the sparse path's bin indices
    for (int64_t g = glo; g < ghi; ++g) {
      absval.clear();
      double tc = 0, tr = 0;
      for (const Segment& s : by_group[g]) {
        const S* x = cur[s.tensor];
        const S* y = ref[s.tensor];
        for (int64_t i = s.begin; i < s.end; ++i) {
          absval.push_back(static_cast<S>(std::abs(static_cast<opmath_t<S>>(x[i]))));
          absval.push_back(static_cast<S>(std::abs(static_cast<opmath_t<S>>(y[i]))));
          tc += std::abs(static_cast<double>(x[i]));
          tr += std::abs(static_cast<double>(y[i]));
        }
      }
      if (!(tc > 0 && tr > 0)) {
        out[g] = 0.f;
        continue;
      }
      const double lo = log_quantile(absval, lower_q);
      // Note [Histogram range] (drift/drift_math.h): never an empty range.
      const double hi = histogram_hi(lo, log_quantile(absval, upper_q), min_log_range);
      if (!dense) {
        const double js = sparse_histogram_js<S>(cur, ref, by_group[g], lo, hi, bins, ic, ir);
        out[g] = static_cast<float>(js_distance(js, base2));
        continue;
      }
      std::fill(hc.begin(), hc.end(), 0.0);
      std::fill(hr.begin(), hr.end(), 0.0);
      for (const Segment& s : by_group[g]) {
        const S* x = cur[s.tensor];
        const S* y = ref[s.tensor];
        for (int64_t i = s.begin; i < s.end; ++i) {
          const int64_t bx = bin_of(log_magnitude(static_cast<double>(x[i])), lo, hi, bins);
          const int64_t by = bin_of(log_magnitude(static_cast<double>(y[i])), lo, hi, bins);
          if (bx >= 0) hc[bx] += 1.0;
          if (by >= 0) hr[by] += 1.0;
        }
      }
      double nc = 0, nr = 0;
      for (int64_t b = 0; b < bins; ++b) {
        nc += hc[b] + 1e-12;
        nr += hr[b] + 1e-12;
      }
      double js = 0;
      for (int64_t b = 0; b < bins; ++b) {
        js += js_term<double>((hc[b] + 1e-12) / nc, (hr[b] + 1e-12) / nr);
      }
      out[g] = static_cast<float>(js_distance(js, base2));
    }
  });
}

}  // namespace

void histogram_drift_cpu(const JsDriftArgs& a, int64_t num_groups, int64_t bins, double lower_q,
                         double upper_q, double min_log_range, bool base2, float* out) {
  FAT_DISPATCH_STATE_TYPES(state_dtype(a), "js_drift_cpu", [&] {
    histogram_drift<scalar_t>(a, num_groups, bins, lower_q, upper_q, min_log_range, base2, out);
  });
}

}  // namespace fisheradaptune
