// js_drift's mode "mass" on CUDA (semantics: drift_mass_cpu.cpp), and the sharded mass ops
// js_mass_totals / js_mass_partial (its two halves, Note [Sharded drift] in drift/drift_math.h):
// pass 1 sums |current| and |reference| per chunk, then per group; pass 2 sums js_term per chunk
// (and updates the reference), then per group (Note [Group order], common/multi_tensor.cuh).
#include "common/stable.h"

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "common/multi_tensor.cuh"
#include "common/plan.h"
#include "drift/drift.h"
#include "drift/drift_cuda.cuh"
#include "drift/drift_math.h"

namespace fisheradaptune {
namespace {

// kChunk: Note [Chunk and block sizes] (common/plan.h).

// The reference EMA with the CPU's rounding: rho * ref + (1 - rho) * cur in float, no fma
// (the CPU's ema_chunk, built with -ffp-contract=off; __fmul_rn / __fadd_rn are never
// contracted by nvcc): bitwise the CPU's result, tested by tests/ops/test_cuda_contract.py.
// bfloat16 state: this float result rounded once on store (store_rn / store16).
__device__ __forceinline__ float ema(float ref, float cur, float rho, float one_minus_rho) {
  return __fadd_rn(__fmul_rn(rho, ref), __fmul_rn(one_minus_rho, cur));
}

// Visits the elements of a chunk as (current, reference) pairs widened to float, with vector
// loads where both are aligned together (Note [Vector alignment]); body(x, y) gets one pair.
template <typename S, typename Body>
__device__ __forceinline__ void for_pairs_of(const DriftChunk& d, Body&& body) {
  constexpr int kVec = 16 / sizeof(S);
  const S* __restrict__ c = static_cast<const S*>(d.current);
  const S* __restrict__ r = static_cast<const S*>(d.reference);
  const int64_t head = mt::aligned_head(d.n, kVec, c, sizeof(S), r, sizeof(S));
  mt::split_loop<kVec>(
      d.n, head, [&](int64_t i) { body(to_float(c[i]), to_float(r[i])); },
      [&](int64_t i) {
        float x[kVec], y[kVec];
        load16(c + i, x);
        load16(r + i, y);
#pragma unroll
        for (int q = 0; q < kVec; ++q) body(x[q], y[q]);
      });
}
template <typename Body>
__device__ __forceinline__ void for_pairs(const DriftChunk& d, Body&& body) {
  if (d.bf16) {  // uniform over the block
    for_pairs_of<__nv_bfloat16>(d, body);
  } else {
    for_pairs_of<float>(d, body);
  }
}

// Visits the elements of a chunk as (current, reference) pairs and writes f(x, y) (a float) back
// to the reference, rounded once to its dtype. Used with `write` false, it only reads.
template <typename S, typename F>
__device__ __forceinline__ void rewrite_pairs_of(const DriftChunk& d, bool write, F&& f) {
  constexpr int kVec = 16 / sizeof(S);
  const S* __restrict__ c = static_cast<const S*>(d.current);
  S* __restrict__ r = static_cast<S*>(d.reference);
  const int64_t head = mt::aligned_head(d.n, kVec, c, sizeof(S), r, sizeof(S));
  mt::split_loop<kVec>(
      d.n, head,
      [&](int64_t i) {
        const float y = f(to_float(c[i]), to_float(r[i]));
        if (write) store_rn(r + i, y);
      },
      [&](int64_t i) {
        float x[kVec], y[kVec];
        load16(c + i, x);
        load16(r + i, y);
#pragma unroll
        for (int q = 0; q < kVec; ++q) y[q] = f(x[q], y[q]);
        if (write) store16(r + i, y);
      });
}
template <typename F>
__device__ __forceinline__ void rewrite_pairs(const DriftChunk& d, bool write, F&& f) {
  if (d.bf16) {  // uniform over the block
    rewrite_pairs_of<__nv_bfloat16>(d, write, f);
  } else {
    rewrite_pairs_of<float>(d, write, f);
  }
}

struct EmaOp {
  float rho, one_minus_rho;
  __device__ void operator()(const DriftChunk& d, int64_t) const {
    rewrite_pairs(d, /*write=*/true,
                  [&](float x, float y) { return ema(y, x, rho, one_minus_rho); });
  }
};

struct MassTotalsOp {
  double* pc;
  double* pr;
  __device__ void operator()(const DriftChunk& d, int64_t k) const {
    double sc = 0.0, sr = 0.0;
    for_pairs(d, [&](float x, float y) {
      sc += fabs(static_cast<double>(x));
      sr += fabs(static_cast<double>(y));
    });
    sc = mt::block_sum(sc);
    sr = mt::block_sum(sr);
    if (threadIdx.x == 0) {
      pc[k] = sc;
      pr[k] = sr;
    }
  }
};

struct MassGroupTotalsOp {
  const double* pc;
  const double* pr;
  const int64_t* offsets;
  double* tc;
  double* tr;
  __device__ void operator()(int64_t g) const {
    const double a = mt::slot_sum(pc, offsets[g], offsets[g + 1]);
    const double b = mt::slot_sum(pr, offsets[g], offsets[g + 1]);
    if (threadIdx.x == 0) {
      tc[g] = a;
      tr[g] = b;
    }
  }
};

struct MassScoreOp {
  const double* tc;
  const double* tr;
  double* partials;
  int64_t num_grouped;
  float rho, one_minus_rho;
  bool update;

  __device__ void operator()(const DriftChunk& d, int64_t k) const {
    const bool grouped = k < num_grouped;
    bool score = false;
    MassScale pc{1.0, 0.0}, pr{1.0, 0.0};
    if (grouped) {
      const double a = tc[d.group], b = tr[d.group];
      score = a > 0 && b > 0;
      if (score) {  // Note [Tiny totals] (drift/drift_math.h): no inf from a subnormal total
        pc = mass_scale(a);
        pr = mass_scale(b);
      }
    }
    double s = 0.0;
    if (score || update) {
      // Each element is scored from the reference as it was, then updated by the same thread.
      rewrite_pairs(d, update, [&](float x, float y) -> float {
        if (score) {
          s += js_term<double>(pc.of(fabs(static_cast<double>(x))),
                               pr.of(fabs(static_cast<double>(y))));
        }
        return update ? ema(y, x, rho, one_minus_rho) : y;
      });
    }
    if (grouped) {
      s = mt::block_sum(s);
      if (threadIdx.x == 0) partials[k] = s;
    }
  }
};

// Per group: the sum of its chunks' js_term partials (the sharded ops' second half).
struct MassGroupSumOp {
  const double* partials;
  const int64_t* offsets;
  double* js;
  __device__ void operator()(int64_t g) const {
    const double s = mt::slot_sum(partials, offsets[g], offsets[g + 1]);
    if (threadIdx.x == 0) js[g] = s;
  }
};

struct MassFinishOp {
  const double* js;
  const double* tc;
  const double* tr;
  float* out;
  bool base2;
  __device__ void operator()(int64_t g) const {
    if (threadIdx.x == 0) {
      out[g] = (tc[g] > 0 && tr[g] > 0) ? static_cast<float>(js_distance(js[g], base2)) : 0.f;
    }
  }
};

// The chunk table of the mass passes on the device: the grouped chunks in group order, then
// (with `gaps`, for the reference update) the ungrouped ones. The grouped prefix is the same
// either way, so one table serves both passes.
struct MassTable {
  const DriftChunk* chunks;
  const int64_t* group_offsets;
  int64_t num_grouped;  // grouped chunks, first in the table
  int64_t count;        // all chunks
};

// Builds and uploads the table, and calls body(table) while it is alive. `gaps` is set exactly
// when the call updates the reference.
template <typename Body>
void with_mass_table(const JsDriftArgs& a, int64_t G, bool gaps, const Device& device,
                     Body body) {
  const Plan plan = make_plan(a.segments, a.numels, G, kChunk, /*cover_gaps=*/gaps);
  const StateBases bases = state_bases(a, /*update=*/gaps);
  std::vector<DriftChunk> table;
  for (const int64_t k : mt::group_ordered(plan, /*with_ungrouped=*/gaps)) {
    const Chunk& c = plan.chunks[k];
    table.push_back(bases.chunk(c, c.group));
  }
  mt::DeviceBundle bundle;
  const int64_t table_at = bundle.add(table);
  const int64_t offsets_at = bundle.add(plan.group_offsets);
  bundle.upload(device);
  body(MassTable{bundle.get<DriftChunk>(table_at), bundle.get<int64_t>(offsets_at),
                 static_cast<int64_t>(plan.group_chunks.size()),
                 static_cast<int64_t>(table.size())});
}

// Mass mode, first half: tc[g] = sum |current|, tr[g] = sum |reference| over each group.
void mass_totals(const MassTable& t, int64_t G, double* tc, double* tr, const Device& device,
                 cudaStream_t stream) {
  if (G == 0) return;
  const Tensor scratch = empty({2 * t.num_grouped + 1}, ScalarType::Double, device);
  double* pc = scratch.mutable_data_ptr<double>();
  double* pr = pc + t.num_grouped;
  mt::launch_chunks(t.chunks, t.num_grouped, MassTotalsOp{pc, pr}, stream);
  mt::launch_groups(G, MassGroupTotalsOp{pc, pr, t.group_offsets, tc, tr}, stream);
}

// Mass mode, second half: js[g] = the sum of js_term over the group's elements with the
// totals tc, tr; with rho (the table then has the gaps too), also the reference update
// (every element, after it is scored).
void mass_partial(const MassTable& t, int64_t G, const double* tc, const double* tr,
                  std::optional<double> rho, double* js, const Device& device,
                  cudaStream_t stream) {
  const bool update = rho.has_value();
  if (t.count == 0 && G == 0) return;
  const Tensor scratch = empty({t.num_grouped + 1}, ScalarType::Double, device);
  double* partials = scratch.mutable_data_ptr<double>();
  const float rho_f = update ? static_cast<float>(*rho) : 0.f;
  const float one_minus = 1.f - rho_f;  // in float, as the CPU's (S(1) - rho)
  mt::launch_chunks(t.chunks, update ? t.count : t.num_grouped,
                    MassScoreOp{tc, tr, partials, t.num_grouped, rho_f, one_minus, update},
                    stream);
  mt::launch_groups(G, MassGroupSumOp{partials, t.group_offsets, js}, stream);
}

}  // namespace

void mass_drift_cuda(const JsDriftArgs& a, int64_t G, std::optional<double> rho, bool base2,
                     const Tensor& out, cudaStream_t stream) {
  const Device device = out.device();
  // tc, tr, js: one per group.
  const Tensor scratch = zeros({3 * G + 1}, ScalarType::Double, device);
  double* tc = scratch.mutable_data_ptr<double>();
  double* tr = tc + G;
  double* js = tr + G;
  with_mass_table(a, G, /*gaps=*/rho.has_value(), device, [&](const MassTable& t) {
    mass_totals(t, G, tc, tr, device, stream);
    mass_partial(t, G, tc, tr, rho, js, device, stream);
  });
  if (G > 0) {
    mt::launch_groups(G, MassFinishOp{js, tc, tr, out.mutable_data_ptr<float>(), base2}, stream);
  }
}

void update_reference_cuda(const JsDriftArgs& a, double rho, const Device& device,
                           cudaStream_t stream) {
  const Plan all = make_plan({}, a.numels, 0, kChunk, /*cover_gaps=*/true);
  if (all.chunks.empty()) return;
  const StateBases bases = state_bases(a, /*update=*/true);
  std::vector<DriftChunk> table;
  table.reserve(all.chunks.size());
  for (const Chunk& c : all.chunks) table.push_back(bases.chunk(c, -1));
  mt::DeviceBundle bundle;
  const int64_t table_at = bundle.add(table);
  bundle.upload(device);
  const float rho_f = static_cast<float>(rho);
  mt::launch_chunks(bundle.get<DriftChunk>(table_at), static_cast<int64_t>(table.size()),
                    EmaOp{rho_f, 1.f - rho_f}, stream);
}

namespace {

Tensor js_mass_totals_cuda(const std::vector<Tensor>& current,
                           const std::vector<Tensor>& reference, const Tensor& segments,
                           int64_t num_groups) {
  mt::check_not_capturing("js_mass_totals", "it uploads a per-call chunk table from pinned host "
                          "memory", current.empty() ? segments : current[0]);
  const JsDriftArgs a = validate_js_mass("js_mass_totals", current, reference, segments,
                                         num_groups, std::nullopt, std::nullopt);
  // The device validate_js_mass checked every tensor against, made current.
  const Tensor& on = cuda_anchor("js_mass_totals", current, segments);
  const Device device = on.device();
  const mt::TensorDeviceGuard guard(on);
  Tensor out = zeros({2, num_groups}, ScalarType::Double, device);
  double* o = out.mutable_data_ptr<double>();
  const cudaStream_t stream = mt::current_stream(on.get_device_index());
  with_mass_table(a, num_groups, /*gaps=*/false, device, [&](const MassTable& t) {
    mass_totals(t, num_groups, o, o + num_groups, device, stream);
  });
  return out;
}

Tensor js_mass_partial_cuda(const std::vector<Tensor>& current,
                            const std::vector<Tensor>& reference, const Tensor& segments,
                            int64_t num_groups, const Tensor& totals,
                            std::optional<double> update_reference) {
  mt::check_not_capturing("js_mass_partial", "it uploads a per-call chunk table from pinned host "
                          "memory", current.empty() ? segments : current[0]);
  const JsDriftArgs a = validate_js_mass("js_mass_partial", current, reference, segments,
                                         num_groups, totals, update_reference);
  // The device validate_js_mass checked every tensor against, made current.
  const Tensor& on = cuda_anchor("js_mass_partial", current, segments);
  const Device device = on.device();
  const mt::TensorDeviceGuard guard(on);
  const Tensor t = as_contiguous(totals);
  Tensor out = zeros({num_groups}, ScalarType::Double, device);
  const double* tc = t.const_data_ptr<double>();
  double* js = out.mutable_data_ptr<double>();
  const cudaStream_t stream = mt::current_stream(on.get_device_index());
  with_mass_table(a, num_groups, /*gaps=*/update_reference.has_value(), device,
                  [&](const MassTable& t) {
    mass_partial(t, num_groups, tc, tc + num_groups, update_reference, js, device, stream);
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fisheradaptune, CUDA, m) {
  m.impl("js_mass_totals", TORCH_BOX(&js_mass_totals_cuda));
  m.impl("js_mass_partial", TORCH_BOX(&js_mass_partial_cuda));
}

}  // namespace fisheradaptune
