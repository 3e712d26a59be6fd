// CPU kernel of fisher_accumulate_: one vectorised pass per chunk that updates the Fisher,
// skips non-finite elements and produces the chunk's partial sum; chunks run in parallel and
// partials are added per group in plan order (bitwise reproducible for any thread count).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cfloat>
#include <limits>

#include "args.h"

namespace fisheradaptune {
namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per chunk: the unit of parallel work
constexpr int64_t kBlock = 1024;     // float lanes are flushed into a double every block

struct Partial {
  double sum = 0;
  int64_t skipped = 0;
};

template <typename G>
inline at::vec::Vectorized<float> load_float(const G* p) {
  using Vec = at::vec::Vectorized<float>;
  if constexpr (std::is_same_v<G, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float<G>(p, out);
    return out;
  }
}

// Note [Skipping]: an element is skipped (its Fisher left as it was) when the update would not
// be finite. That covers NaN and Inf gradients and also finite gradients whose square
// overflows, so a bad step can never poison the Fisher. One comparison, |new| <= max, catches
// all of them and vectorises (NaN compares false).
template <typename G>
Partial update_float(float* f, const G* g, int64_t n, float decay, float scale) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t W = Vec::size();
  const Vec vdecay(decay), vscale(scale), vmax(FLT_MAX), zero(0.f), one(1.f);
  Partial out;
  int64_t i = 0;
  for (; i + W <= n;) {
    Vec acc(0.f), bad(0.f);
    const int64_t stop = std::min(n, i + kBlock) - W;
    for (; i <= stop; i += W) {
      const Vec old = Vec::loadu(f + i);
      const Vec gv = load_float(g + i);
      const Vec updated = at::vec::fmadd(vscale * gv, gv, vdecay * old);
      const Vec ok = updated.abs() <= vmax;  // all-ones lanes where finite
      const Vec kept = Vec::blendv(old, updated, ok);
      kept.store(f + i);
      acc += kept;
      bad += Vec::blendv(one, zero, ok);
    }
    out.sum += static_cast<double>(at::vec::vec_reduce_all(std::plus<Vec>(), acc));
    out.skipped += static_cast<int64_t>(at::vec::vec_reduce_all(std::plus<Vec>(), bad));
  }
  for (; i < n; ++i) {
    const float gv = static_cast<float>(g[i]);
    const float updated = decay * f[i] + scale * gv * gv;
    if (std::abs(updated) <= FLT_MAX) {
      f[i] = updated;
    } else {
      ++out.skipped;
    }
    out.sum += f[i];
  }
  return out;
}

// float64 state is for gradcheck-style tests, so a plain loop is enough.
template <typename G>
Partial update_double(double* f, const G* g, int64_t n, double decay, double scale) {
  Partial out;
  for (int64_t i = 0; i < n; ++i) {
    const double gv = static_cast<double>(g[i]);
    const double updated = decay * f[i] + scale * gv * gv;
    if (std::abs(updated) <= DBL_MAX) {
      f[i] = updated;
    } else {
      ++out.skipped;
    }
    out.sum += f[i];
  }
  return out;
}

template <typename S>
Partial sum_only(const S* f, int64_t n) {
  Partial out;
  if constexpr (std::is_same_v<S, float>) {
    using Vec = at::vec::Vectorized<float>;
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t len = std::min(kBlock, n - b);
      out.sum += static_cast<double>(at::vec::reduce_all<float>(
          [](Vec a, Vec c) { return a + c; }, f + b, len));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) out.sum += f[i];
  }
  return out;
}

Partial run_chunk(const at::Tensor& fisher, const at::Tensor& grad, const Chunk& c, double decay,
                  double scale) {
  const int64_t n = c.end - c.begin;
  if (fisher.scalar_type() == at::kFloat) {
    float* f = fisher.data_ptr<float>() + c.begin;
    if (!grad.defined()) return sum_only(f, n);
    Partial p;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "fisher_cpu",
                                    [&] {
                                      if constexpr (std::is_same_v<scalar_t, double>) {
                                        TORCH_INTERNAL_ASSERT(false, "float64 grad, float32 state");
                                      } else {
                                        p = update_float<scalar_t>(
                                            f, grad.const_data_ptr<scalar_t>() + c.begin, n,
                                            static_cast<float>(decay), static_cast<float>(scale));
                                      }
                                    });
    return p;
  }
  double* f = fisher.data_ptr<double>() + c.begin;
  if (!grad.defined()) return sum_only(f, n);
  Partial p;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "fisher_cpu", [&] {
    p = update_double<scalar_t>(f, grad.const_data_ptr<scalar_t>() + c.begin, n, decay, scale);
  });
  return p;
}

void fisher_accumulate_cpu(at::TensorList fisher, const c10::List<std::optional<at::Tensor>>& grads,
                           double decay, double scale, const std::optional<at::Tensor>& segments,
                           const at::Tensor& group_sums, const at::Tensor& nonfinite) {
  FisherAccumulateArgs args =
      validate_fisher_accumulate(fisher, grads, decay, scale, segments, group_sums, nonfinite);
  // Tensors without a gradient are still visited when they hold grouped elements: group_sums
  // reports the Fisher as it stands after the call, updated or not.
  const Plan plan = make_plan(args.segments, args.numels, args.num_groups, kChunk,
                              /*cover_gaps=*/true);
  std::vector<Partial> partials(plan.chunks.size());
  at::parallel_for(0, static_cast<int64_t>(plan.chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Chunk& c = plan.chunks[k];
      const at::Tensor& g = args.grads[c.tensor];
      if (!g.defined() && c.group < 0) continue;  // nothing to update, nothing to report
      partials[k] = run_chunk(args.fisher[c.tensor], g, c, decay, scale);
    }
  });
  int64_t skipped = 0;
  for (const Partial& p : partials) skipped += p.skipped;
  nonfinite.fill_(skipped);
  float* sums = group_sums.data_ptr<float>();
  for (int64_t g = 0; g < args.num_groups; ++g) {
    double s = 0;
    for (int64_t k = plan.group_offsets[g]; k < plan.group_offsets[g + 1]; ++k) {
      s += partials[plan.group_chunks[k]].sum;
    }
    sums[g] = static_cast<float>(s);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fisheradaptune, CPU, m) {
  m.impl("fisher_accumulate_", &fisher_accumulate_cpu);
}

}  // namespace fisheradaptune
