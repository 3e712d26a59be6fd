// CPU kernel of fisher_accumulate_: one vectorised pass per chunk (Note [CPU vectorisation])
// that updates the Fisher, skips non-finite elements and produces the chunk's partial sum;
// chunks run in parallel and partials are added per group in plan order (bitwise reproducible
// for any thread count).
#include "common/stable.h"

#include <cfloat>
#include <limits>

#include "common/plan.h"
#include "common/simd.h"
#include "fisher/fisher_accumulate.h"
#include "common/state.h"

namespace fisheradaptune {
namespace {

// kChunk and kBlock: Note [Chunk and block sizes] (common/plan.h).

struct Partial {
  double sum = 0;
  int64_t skipped = 0;
};

// Note [Skipping]: an element is skipped (its Fisher left as it was) when the update would not
// be finite. That covers NaN and Inf gradients and also finite gradients whose square
// overflows, so a bad step can never poison the Fisher. One comparison, |new| <= max, catches
// all of them and vectorises (NaN compares false). It tests the value as stored: for bfloat16
// state (Note [bfloat16 state], common/state.h) the float32 update rounded to bfloat16,
// so an update that overflows only on that rounding is skipped too.
//
// The update is computed in T = opmath_t<S> (float for bfloat16 state, else S itself), as
// (decay * old) + ((scale * g) * g); for float and double the round trip through S is the
// identity. Sums are kept in T within a block of kBlock elements, then in double.
template <typename S, typename G>
FAT_CPU_CLONES Partial update(typename StateIO<S>::storage* f, const G* g, int64_t n,
                              opmath_t<S> decay, opmath_t<S> scale) {
  using T = opmath_t<S>;
  using IO = StateIO<S>;
  using Stored = typename IO::storage;
  constexpr T kMax = state_max<S>();
  Partial out;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    T acc = 0;
    int32_t bad = 0;  // int32 lanes pair with float lanes; a block never overflows it
    FAT_SIMD_REDUCE(acc, bad)
    for (int64_t i = b; i < e; ++i) {
      const Stored stored_old = f[i];
      const T old = IO::load(stored_old);
      const T gv = static_cast<T>(g[i]);
      const T updated = decay * old + scale * gv * gv;
      const Stored stored = IO::store(updated);  // one rounding (none for float and double)
      const T back = IO::load(stored);
      const bool ok = std::abs(back) <= kMax;
      f[i] = IO::select(ok, stored, stored_old);
      acc += ok ? back : old;
      bad += ok ? 0 : 1;
    }
    out.sum += static_cast<double>(acc);
    out.skipped += bad;
  }
  return out;
}

template <typename S>
FAT_CPU_CLONES Partial sum_only(const typename StateIO<S>::storage* f, int64_t n) {
  using T = opmath_t<S>;
  Partial out;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    T acc = 0;
    FAT_SIMD_REDUCE(acc)
    for (int64_t i = b; i < e; ++i) acc += StateIO<S>::load(f[i]);
    out.sum += static_cast<double>(acc);
  }
  return out;
}

// One tensor of the call as the chunks read it, gathered before the parallel region so that
// no chunk calls into libtorch (each accessor is a shim call; Note [Stable ABI]).
struct TensorView {
  void* fisher = nullptr;
  const void* grad = nullptr;  // null: no gradient
  ScalarType state = ScalarType::Float;
  ScalarType grad_type = ScalarType::Float;
};

Partial run_chunk(const TensorView& v, const Chunk& c, double decay, double scale) {
  const int64_t n = c.end - c.begin;
  Partial p;
  FAT_DISPATCH_STATE_TYPES(v.state, "fisher_cpu_state", [&] {
    using S = scalar_t;
    auto* f = static_cast<typename StateIO<S>::storage*>(v.fisher) + c.begin;
    if (v.grad == nullptr) {
      p = sum_only<S>(f, n);
      return;
    }
    FAT_DISPATCH_FLOATING_AND_HALF(v.grad_type, "fisher_cpu", [&] {
      p = update<S, scalar_t>(f, static_cast<const scalar_t*>(v.grad) + c.begin, n,
                              static_cast<opmath_t<S>>(decay), static_cast<opmath_t<S>>(scale));
    });
  });
  return p;
}

void fisher_accumulate_cpu(const std::vector<Tensor>& fisher,
                           const std::vector<std::optional<Tensor>>& grads, double decay,
                           double scale, const std::optional<Tensor>& segments,
                           const Tensor& group_sums, const Tensor& nonfinite) {
  FisherAccumulateArgs args =
      validate_fisher_accumulate(fisher, grads, decay, scale, segments, group_sums, nonfinite);
  // Tensors without a gradient are still visited when they hold grouped elements: group_sums
  // reports the Fisher as it stands after the call, updated or not.
  const Plan plan = make_plan(args.segments, args.numels, args.num_groups, kChunk,
                              /*cover_gaps=*/true);
  std::vector<TensorView> views(args.fisher.size());
  for (size_t t = 0; t < args.fisher.size(); ++t) {
    if (args.numels[t] == 0) continue;  // no chunks
    views[t].fisher = args.fisher[t].mutable_data_ptr();
    views[t].state = args.fisher[t].scalar_type();
    if (args.grads[t].defined()) {
      views[t].grad = args.grads[t].const_data_ptr();
      views[t].grad_type = args.grads[t].scalar_type();
    }
  }
  std::vector<Partial> partials(plan.chunks.size());
  st::parallel_for(0, static_cast<int64_t>(plan.chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Chunk& c = plan.chunks[k];
      const TensorView& v = views[c.tensor];
      if (v.grad == nullptr && c.group < 0) continue;  // nothing to update, nothing to report
      partials[k] = run_chunk(v, c, decay, scale);
    }
  });
  int64_t skipped = 0;
  for (const Partial& p : partials) skipped += p.skipped;
  // nonfinite is validated to hold one int64 on this (CPU) device.
  *nonfinite.mutable_data_ptr<int64_t>() = skipped;
  float* sums = args.num_groups > 0 ? group_sums.mutable_data_ptr<float>() : nullptr;
  for (int64_t g = 0; g < args.num_groups; ++g) {
    double s = 0;
    for (int64_t k = plan.group_offsets[g]; k < plan.group_offsets[g + 1]; ++k) {
      s += partials[plan.group_chunks[k]].sum;
    }
    sums[g] = static_cast<float>(s);
  }
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fisheradaptune, CPU, m) {
  m.impl("fisher_accumulate_", TORCH_BOX(&fisher_accumulate_cpu));
}

}  // namespace fisheradaptune
