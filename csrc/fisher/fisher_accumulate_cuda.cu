// CUDA kernel of fisher_accumulate_ (semantics: csrc/fisher/fisher_accumulate_cpu.cpp). One launch
// over the chunk table updates every Fisher element and writes one partial per grouped chunk; a
// second launch adds each group's partials in plan order (Note [Group order],
// common/multi_tensor.cuh).
#include "common/stable.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>

#include "common/multi_tensor.cuh"
#include "common/vec16.cuh"
#include "common/plan.h"
#include "fisher/fisher_accumulate.h"
#include "common/state.h"

namespace fisheradaptune {
namespace {

// kChunk (Note [Chunk and block sizes], common/plan.h) is one block's work here: with 256
// threads, 128 elements (32 float4) per thread, and ViT-B's 86M elements give ~2.7K blocks,
// several waves over an H100's ~1K resident blocks, so the blocks cut short at segment ends and
// the last wave cost little. Tune on the device (in common/plan.h: CPU and CUDA share the
// chunking).

// The gradient dtype of a chunk; grads may mix dtypes across the list, so it is per chunk and
// the kernel branches on it (uniformly per block).
enum GradKind : int32_t { kNoGrad = 0, kF32 = 1, kBF16 = 2, kF16 = 3 };

// The state dtype of a chunk (Note [bfloat16 state], common/state.h); per tensor, like
// the gradient's.
enum StateKind : int32_t { kStateF32 = 0, kStateBF16 = 1 };

struct FisherChunk {
  void* fisher;      // offset to the chunk's first element (float or __nv_bfloat16)
  const void* grad;  // likewise; null for kNoGrad
  int64_t n;
  int32_t kind;
  int32_t state;     // StateKind
};

// One element, Note [Skipping] (fisher/fisher_accumulate_cpu.cpp): an update that is not finite
// (NaN/Inf gradient, or a square that overflows) leaves the element as it was and is counted.
//
// Note [CPU-identical Fisher update]
// The CPU kernel computes decay * old + scale * g * g in float with -ffp-contract=off, i.e.
// (decay * old) + ((scale * g) * g), three roundings and no fma. nvcc would contract that
// expression into an fma (--fmad=true is its default), so the rounding is spelled out with
// __fmul_rn / __fadd_rn, which nvcc never contracts: every updated Fisher element, and hence
// the skip decision and the nonfinite count, is bitwise the CPU's (tested by
// tests/ops/test_cuda_contract.py). The per-group sums are NOT bitwise the CPU's: the CPU adds
// float lanes over blocks of kBlock elements, this kernel adds each thread's share, then a
// double tree (both deterministic on their device).
__device__ __forceinline__ float fisher_step(float old, float g, float decay, float scale,
                                             float& acc, unsigned& bad) {
  const float updated = __fadd_rn(__fmul_rn(decay, old), __fmul_rn(__fmul_rn(scale, g), g));
  const bool ok = fabsf(updated) <= FLT_MAX;  // false for NaN too
  const float kept = ok ? updated : old;
  acc += kept;
  bad += ok ? 0u : 1u;
  return kept;
}

// The same for bfloat16 state (Note [bfloat16 state]): the float update above, rounded once to
// bfloat16 (round to nearest even, as the CPU's conversion), and the skip test on the rounded
// value, so that an update overflowing bfloat16 only on rounding is skipped: bitwise the CPU's.
__device__ __forceinline__ __nv_bfloat16 fisher_step(__nv_bfloat16 stored_old, float g,
                                                     float decay, float scale, float& acc,
                                                     unsigned& bad) {
  const float old = __bfloat162float(stored_old);
  const float updated = __fadd_rn(__fmul_rn(decay, old), __fmul_rn(__fmul_rn(scale, g), g));
  const __nv_bfloat16 stored = __float2bfloat16_rn(updated);
  const float back = __bfloat162float(stored);
  const bool ok = fabsf(back) <= kBFloat16Max;  // false for NaN and Inf
  acc += ok ? back : old;
  bad += ok ? 0u : 1u;
  return ok ? stored : stored_old;
}

// 8 gradient elements as floats from a 16-byte-aligned p (two 16-byte loads for float).
__device__ __forceinline__ void load8(const float* p, float (&out)[8]) {
  float lo[4], hi[4];
  load16(p, lo);
  load16(p + 4, hi);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    out[k] = lo[k];
    out[4 + k] = hi[k];
  }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&out)[8]) { load16(p, out); }
__device__ __forceinline__ void load8(const __half* p, float (&out)[8]) { load16(p, out); }

struct FisherOp {
  double* partials;               // one per grouped slot
  unsigned long long* nonfinite;  // the op's int64 counter
  int64_t num_grouped;            // slots [0, num_grouped) are grouped (Note [Group order])
  float decay, scale;

  template <typename G>
  __device__ void update(const FisherChunk& c, float& acc, unsigned& bad) const {
    constexpr int kVec = 16 / sizeof(G);
    float* __restrict__ f = static_cast<float*>(c.fisher);
    const G* __restrict__ g = static_cast<const G*>(c.grad);
    const int64_t head = mt::aligned_head(c.n, kVec, f, sizeof(float), g, sizeof(G));
    mt::split_loop<kVec>(
        c.n, head,
        [&](int64_t i) { f[i] = fisher_step(f[i], to_float(g[i]), decay, scale, acc, bad); },
        [&](int64_t i) {
          float gv[kVec];
          load16(g + i, gv);
#pragma unroll
          for (int q = 0; q < kVec / 4; ++q) {
            float4 fv = *reinterpret_cast<const float4*>(f + i + 4 * q);
            fv.x = fisher_step(fv.x, gv[4 * q + 0], decay, scale, acc, bad);
            fv.y = fisher_step(fv.y, gv[4 * q + 1], decay, scale, acc, bad);
            fv.z = fisher_step(fv.z, gv[4 * q + 2], decay, scale, acc, bad);
            fv.w = fisher_step(fv.w, gv[4 * q + 3], decay, scale, acc, bad);
            *reinterpret_cast<float4*>(f + i + 4 * q) = fv;
          }
        });
  }

  // bfloat16 state: 8 elements (16 bytes of state) per vector step, whatever the gradient.
  template <typename G>
  __device__ void update_bf16(const FisherChunk& c, float& acc, unsigned& bad) const {
    constexpr int kVec = 8;
    __nv_bfloat16* __restrict__ f = static_cast<__nv_bfloat16*>(c.fisher);
    const G* __restrict__ g = static_cast<const G*>(c.grad);
    const int64_t head = mt::aligned_head(c.n, kVec, f, sizeof(__nv_bfloat16), g, sizeof(G));
    mt::split_loop<kVec>(
        c.n, head,
        [&](int64_t i) { f[i] = fisher_step(f[i], to_float(g[i]), decay, scale, acc, bad); },
        [&](int64_t i) {
          float gv[kVec];
          load8(g + i, gv);
          // Packed in registers (a local array would live in local memory): element 2w is
          // the low half of 32-bit word w.
          const uint4 raw = *reinterpret_cast<const uint4*>(f + i);
          unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const __nv_bfloat16 lo = fisher_step(
                __ushort_as_bfloat16(static_cast<unsigned short>(w[q] & 0xffffu)), gv[2 * q],
                decay, scale, acc, bad);
            const __nv_bfloat16 hi = fisher_step(
                __ushort_as_bfloat16(static_cast<unsigned short>(w[q] >> 16)), gv[2 * q + 1],
                decay, scale, acc, bad);
            w[q] = static_cast<unsigned>(__bfloat16_as_ushort(lo)) |
                   (static_cast<unsigned>(__bfloat16_as_ushort(hi)) << 16);
          }
          *reinterpret_cast<uint4*>(f + i) = make_uint4(w[0], w[1], w[2], w[3]);
        });
  }

  __device__ void sum_only_bf16(const FisherChunk& c, float& acc) const {
    const __nv_bfloat16* __restrict__ f = static_cast<const __nv_bfloat16*>(c.fisher);
    for (int64_t i = threadIdx.x; i < c.n; i += mt::kThreads) acc += __bfloat162float(f[i]);
  }

  // A tensor without gradient still reports its Fisher in the group sums.
  __device__ void sum_only(const FisherChunk& c, float& acc) const {
    const float* __restrict__ f = static_cast<const float*>(c.fisher);
    const int64_t head = mt::aligned_head(c.n, 4, f, sizeof(float));
    mt::split_loop<4>(
        c.n, head, [&](int64_t i) { acc += f[i]; },
        [&](int64_t i) {
          const float4 v = *reinterpret_cast<const float4*>(f + i);
          acc += v.x;
          acc += v.y;
          acc += v.z;
          acc += v.w;
        });
  }

  __device__ void operator()(const FisherChunk& c, int64_t k) const {
    // Per-thread float accumulation over at most kChunk / kThreads elements, as the CPU kernel
    // accumulates float lanes over short blocks; the block tree runs in double.
    float acc = 0.f;
    unsigned bad = 0;
    if (c.state == kStateBF16) {
      switch (c.kind) {  // uniform over the block
        case kF32:
          update_bf16<float>(c, acc, bad);
          break;
        case kBF16:
          update_bf16<__nv_bfloat16>(c, acc, bad);
          break;
        case kF16:
          update_bf16<__half>(c, acc, bad);
          break;
        default:
          sum_only_bf16(c, acc);
          break;
      }
    } else {
    switch (c.kind) {  // uniform over the block
      case kF32:
        update<float>(c, acc, bad);
        break;
      case kBF16:
        update<__nv_bfloat16>(c, acc, bad);
        break;
      case kF16:
        update<__half>(c, acc, bad);
        break;
      default:
        sum_only(c, acc);
        break;
    }
    }
    if (k < num_grouped) {
      const double s = mt::block_sum(static_cast<double>(acc));
      if (threadIdx.x == 0) partials[k] = s;
    }
    if (c.kind != kNoGrad) {
      const unsigned b = mt::block_sum(bad);
      // Integer addition is exact and order-independent: the count is deterministic.
      if (threadIdx.x == 0 && b != 0) atomicAdd(nonfinite, static_cast<unsigned long long>(b));
    }
  }
};

struct GroupSumOp {
  const double* partials;
  const int64_t* offsets;  // Plan::group_offsets
  float* group_sums;

  __device__ void operator()(int64_t g) const {
    const double s = mt::slot_sum(partials, offsets[g], offsets[g + 1]);
    if (threadIdx.x == 0) group_sums[g] = static_cast<float>(s);
  }
};

int32_t grad_kind(const Tensor& g) {
  switch (g.scalar_type()) {
    case ScalarType::Float:
      return kF32;
    case ScalarType::BFloat16:
      return kBF16;
    case ScalarType::Half:
      return kF16;
    default:
      FAT_INTERNAL_ASSERT(false, "fisher_accumulate_ (CUDA): unexpected gradient dtype ",
                          g.scalar_type(), " passed validation");
  }
  return kNoGrad;
}

void fisher_accumulate_cuda(const std::vector<Tensor>& fisher,
                            const std::vector<std::optional<Tensor>>& grads, double decay,
                            double scale, const std::optional<Tensor>& segments,
                            const Tensor& group_sums, const Tensor& nonfinite) {
  mt::check_not_capturing("fisher_accumulate_", "it uploads a per-call chunk table from a "
                          "pinned host buffer", nonfinite);
  const FisherAccumulateArgs args =
      validate_fisher_accumulate(fisher, grads, decay, scale, segments, group_sums, nonfinite);
  // Validation ties every tensor to nonfinite's device; only a CUDA `segments` could have
  // routed CPU tensors here.
  FAT_CHECK_VALUE(nonfinite.is_cuda(), "fisher_accumulate_", "nonfinite",
                  "expected a CUDA tensor for CUDA inputs, got ", nonfinite.device());
  const mt::TensorDeviceGuard guard(nonfinite);
  const cudaStream_t stream = mt::current_stream(nonfinite.get_device_index());

  // The op overwrites the counter (as the CPU kernel's fill_), even when there is no work.
  auto* counter = reinterpret_cast<unsigned long long*>(nonfinite.mutable_data_ptr<int64_t>());
  STD_CUDA_CHECK(cudaMemsetAsync(counter, 0, sizeof(int64_t), stream));

  // cover_gaps: ungrouped elements with a gradient must be updated too.
  const Plan plan =
      make_plan(args.segments, args.numels, args.num_groups, kChunk, /*cover_gaps=*/true);
  const int64_t num_grouped = static_cast<int64_t>(plan.group_chunks.size());

  std::vector<char*> fisher_base(args.fisher.size(), nullptr);
  std::vector<int32_t> states(args.fisher.size(), kStateF32);
  std::vector<int64_t> state_bytes(args.fisher.size(), 4);  // per element, read once
  std::vector<const char*> grad_base(args.fisher.size(), nullptr);
  std::vector<int32_t> kinds(args.fisher.size(), kNoGrad);
  for (size_t t = 0; t < args.fisher.size(); ++t) {
    if (args.numels[t] == 0) continue;  // no chunks
    fisher_base[t] = static_cast<char*>(args.fisher[t].mutable_data_ptr());
    // Validation admits float32 and bfloat16 here (float64 is CPU-only).
    states[t] = args.fisher[t].scalar_type() == ScalarType::BFloat16 ? kStateBF16 : kStateF32;
    state_bytes[t] = states[t] == kStateBF16 ? 2 : 4;
    if (args.grads[t].defined()) {
      grad_base[t] = static_cast<const char*>(args.grads[t].const_data_ptr());
      kinds[t] = grad_kind(args.grads[t]);
    }
  }
  std::vector<FisherChunk> table;
  table.reserve(plan.chunks.size());
  for (const int64_t k : mt::group_ordered(plan, /*with_ungrouped=*/true)) {
    const Chunk& c = plan.chunks[k];
    const int32_t kind = kinds[c.tensor];
    // Nothing to update and nothing to report (slots of grouped chunks are all kept, so the
    // grouped prefix of the table stays intact).
    if (kind == kNoGrad && c.group < 0) continue;
    const char* grad = nullptr;
    if (kind != kNoGrad) grad = grad_base[c.tensor] + c.begin * args.grads[c.tensor].element_size();
    char* fisher = fisher_base[c.tensor] + c.begin * state_bytes[c.tensor];
    table.push_back(FisherChunk{fisher, grad, c.end - c.begin, kind, states[c.tensor]});
  }
  if (table.empty() && args.num_groups == 0) return;

  mt::DeviceBundle bundle;
  const int64_t table_at = bundle.add(table);
  const int64_t offsets_at = bundle.add(plan.group_offsets);
  bundle.upload(nonfinite.device());

  const Tensor partials =
      empty({std::max<int64_t>(num_grouped, 1)}, ScalarType::Double, nonfinite.device());
  FisherOp op{partials.mutable_data_ptr<double>(), counter, num_grouped, static_cast<float>(decay),
              static_cast<float>(scale)};
  mt::launch_chunks(bundle.get<FisherChunk>(table_at), static_cast<int64_t>(table.size()), op,
                    stream);
  // Every group gets a value, 0 for a group without elements.
  mt::launch_groups(args.num_groups,
                    GroupSumOp{partials.const_data_ptr<double>(), bundle.get<int64_t>(offsets_at),
                               group_sums.mutable_data_ptr<float>()},
                    stream);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fisheradaptune, CUDA, m) {
  m.impl("fisher_accumulate_", TORCH_BOX(&fisher_accumulate_cuda));
}

}  // namespace fisheradaptune
