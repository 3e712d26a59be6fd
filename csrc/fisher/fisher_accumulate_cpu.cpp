// CPU kernel of fisher_accumulate_: one vectorised pass per chunk (Note [CPU vectorisation])
// that updates the Fisher, skips non-finite elements and produces the chunk's partial sum;
// chunks run in parallel and partials are added per group in plan order (bitwise reproducible
// for any thread count).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cfloat>
#include <limits>

#include "fisher/fisher_accumulate.h"
#include "common/simd.h"
#include "plan.h"

namespace fisheradaptune {
namespace {

// kChunk and kBlock: Note [Chunk and block sizes] (plan.h).

struct Partial {
  double sum = 0;
  int64_t skipped = 0;
};

// Note [Skipping]: an element is skipped (its Fisher left as it was) when the update would not
// be finite. That covers NaN and Inf gradients and also finite gradients whose square
// overflows, so a bad step can never poison the Fisher. One comparison, |new| <= max, catches
// all of them and vectorises (NaN compares false).
//
// Sums are kept in the state's precision within a block of kBlock elements, then in double.
template <typename S, typename G>
FAT_CPU_CLONES Partial update(S* f, const G* g, int64_t n, S decay, S scale) {
  constexpr S kMax = std::numeric_limits<S>::max();
  Partial out;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    S acc = 0;
    int32_t bad = 0;  // int32 lanes pair with float lanes; a block never overflows it
    FAT_SIMD_REDUCE(acc, bad)
    for (int64_t i = b; i < e; ++i) {
      const S old = f[i];
      const S gv = static_cast<S>(g[i]);
      const S updated = decay * old + scale * gv * gv;
      const bool ok = std::abs(updated) <= kMax;
      const S kept = ok ? updated : old;
      f[i] = kept;
      acc += kept;
      bad += ok ? 0 : 1;
    }
    out.sum += static_cast<double>(acc);
    out.skipped += bad;
  }
  return out;
}

template <typename S>
FAT_CPU_CLONES Partial sum_only(const S* f, int64_t n) {
  Partial out;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    S acc = 0;
    FAT_SIMD_REDUCE(acc)
    for (int64_t i = b; i < e; ++i) acc += f[i];
    out.sum += static_cast<double>(acc);
  }
  return out;
}

Partial run_chunk(const at::Tensor& fisher, const at::Tensor& grad, const Chunk& c, double decay,
                  double scale) {
  const int64_t n = c.end - c.begin;
  Partial p;
  AT_DISPATCH_FLOATING_TYPES(fisher.scalar_type(), "fisher_cpu_state", [&] {
    using S = scalar_t;
    S* f = fisher.data_ptr<S>() + c.begin;
    if (!grad.defined()) {
      p = sum_only(f, n);
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "fisher_cpu", [&] {
      p = update<S, scalar_t>(f, grad.const_data_ptr<scalar_t>() + c.begin, n,
                              static_cast<S>(decay), static_cast<S>(scale));
    });
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
