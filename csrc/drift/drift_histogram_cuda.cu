// js_drift's mode "histogram" on CUDA (semantics: drift_histogram_cpu.cpp), called by js_drift's
// CUDA kernel (drift_cuda.cu).
//
// Note [Histogram quantiles on the device]
// The bin range needs, per group, order statistics of the union of both snapshots' log-
// magnitudes. log_magnitude is monotone in |x|, and for non-negative float32 values the bit
// pattern, read as an unsigned integer, orders exactly as the value does; the CPU kernel also
// takes order statistics of |x| in the state dtype (float32 on CUDA) and transforms them
// afterwards. So each order statistic is found by histogram refinement over the 31-bit key
// bits(|x|): a pass histograms, per group and per target rank, the keys that share the bracket
// (prefix) found so far, into 2^11 bins of the next bits, and a small per-group kernel narrows
// each bracket to the bin holding its rank.
// Three passes (11 + 11 + 9 bits) pin the key down completely: the order statistics are EXACT
// (not merely within 1e-4 of the range), the pass count is fixed, so no data-dependent loop and
// no host synchronisation is needed, and no min/max pass is needed to set up the bracket. The
// four ranks per group (floor(h) and floor(h)+1 for each quantile, h = (n-1) q, n = 2 * group
// size) are computed on the host in double exactly as the CPU does; targets whose brackets
// coincide share one histogram. Counts are integer atomics (exact, order-independent), so the
// result is deterministic. lo/hi then follow drift/drift_math.h in double (lerp_numpy and
// histogram_hi round as on the CPU, Note [Uncontracted arithmetic]); they can differ from the
// CPU's only through the last-ulp rounding of the device's log10, so a value within an ulp of a
// bin edge may land in the neighbouring bin: histogram distances agree with the CPU's closely,
// not bitwise. The reference update (EmaOp, and the update fused into MassScoreOp) IS bitwise
// the CPU's.
#include "common/stable.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/multi_tensor.cuh"
#include "common/plan.h"
#include "drift/drift.h"
#include "drift/drift_cuda.cuh"
#include "drift/drift_math.h"

namespace fisheradaptune {
namespace {

// kChunk: Note [Chunk and block sizes] (common/plan.h).

constexpr int kTargets = 4;  // floor(h) and floor(h)+1 of both quantiles
constexpr int kRadixPasses = 3;
constexpr int kRadixBins = 1 << 11;  // the widest pass
// Key bits [pass_shift, pass_shift + pass_bits) are resolved by each pass, high bits first.
__host__ __device__ constexpr int pass_bits(int pass) { return pass < 2 ? 11 : 9; }
__host__ __device__ constexpr int pass_shift(int pass) {
  return pass == 0 ? 20 : (pass == 1 ? 9 : 0);
}
static_assert(pass_bits(0) + pass_bits(1) + pass_bits(2) == 31, "passes cover bits(|x|)");
static_assert(pass_shift(2) == 0 && pass_shift(1) == pass_bits(2) &&
                  pass_shift(0) == pass_bits(1) + pass_bits(2),
              "passes are contiguous bit ranges, high to low");
static_assert((1 << pass_bits(0)) == kRadixBins && (1 << pass_bits(1)) == kRadixBins,
              "no pass is wider than a histogram row");
static_assert((1 << pass_bits(2)) % mt::kThreads == 0 && kRadixBins % mt::kThreads == 0,
              "the selection scan gives every thread whole bins");

// Group flags, set with integer atomicOr by the first pass.
constexpr uint32_t kPositiveCurrent = 1, kNanCurrent = 2, kPositiveReference = 4,
                   kNanReference = 8;

// The CPU's test sum|current| > 0 && sum|reference| > 0 in exact terms: some nonzero value on
// each side (an Inf counts) and no NaN on either.
__host__ __device__ inline bool group_valid(uint32_t flags) {
  return (flags & (kPositiveCurrent | kPositiveReference)) ==
             (kPositiveCurrent | kPositiveReference) &&
         (flags & (kNanCurrent | kNanReference)) == 0;
}

// Per-group selection state, initialised on the host, advanced by the passes.
struct GroupSelect {
  int64_t rank[kTargets];     // rank among the keys with this prefix; -1: target unused
  uint32_t prefix[kTargets];  // key bits fixed so far, right-aligned
  int32_t alias[kTargets];    // first target with the same prefix: whose histogram j reads
  double frac_lo, frac_hi;    // h - floor(h) of the two quantiles
  double lo, hi;              // the bin range, once known
  uint32_t flags;
  uint32_t unused;
};

__host__ __device__ inline void assign_aliases(GroupSelect& s) {
  for (int j = 0; j < kTargets; ++j) {
    s.alias[j] = j;
    if (s.rank[j] < 0) continue;
    for (int i = 0; i < j; ++i) {
      if (s.rank[i] >= 0 && s.prefix[i] == s.prefix[j]) {
        s.alias[j] = i;
        break;
      }
    }
  }
}

__device__ __forceinline__ uint32_t abs_key(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// Histogram rows of a batch of groups: [group - g0][target][kRadixBins], 64-bit counts.
struct RadixCountOp {
  GroupSelect* sel;
  unsigned long long* hist;
  int64_t g0;
  int pass;

  __device__ void operator()(const DriftChunk& d, int64_t) const {
    __shared__ unsigned counts[kTargets][kRadixBins];
    GroupSelect* s = sel + d.group;
    if (pass > 0 && !group_valid(s->flags)) return;  // uniform; such a group scores 0
    const int shift = pass_shift(pass);
    const int high = shift + pass_bits(pass);
    const uint32_t mask = (1u << pass_bits(pass)) - 1u;
    bool own[kTargets];
    uint32_t prefix[kTargets];
#pragma unroll
    for (int j = 0; j < kTargets; ++j) {
      own[j] = s->rank[j] >= 0 && s->alias[j] == j;
      prefix[j] = s->prefix[j];
    }
    for (int i = threadIdx.x; i < kTargets * kRadixBins; i += mt::kThreads) {
      counts[i / kRadixBins][i % kRadixBins] = 0u;
    }
    __syncthreads();
    uint32_t seen = 0;
    auto count = [&](float v, uint32_t positive, uint32_t nan) {
      const uint32_t key = abs_key(v);
      if (key - 1u < 0x7f800000u) {
        seen |= positive;  // 0 < |v| <= Inf
      } else if (key > 0x7f800000u) {
        seen |= nan;
      }
#pragma unroll
      for (int j = 0; j < kTargets; ++j) {
        // high <= 31, so the shift is defined; in pass 0 every key matches the empty prefix.
        if (own[j] && (key >> high) == prefix[j]) atomicAdd(&counts[j][(key >> shift) & mask], 1u);
      }
    };
    // bfloat16 state is read widened to float (exact): the keys order it as its own values.
    for_values(d.current, d.bf16, d.n, [&](float v) { count(v, kPositiveCurrent, kNanCurrent); });
    for_values(d.reference, d.bf16, d.n,
               [&](float v) { count(v, kPositiveReference, kNanReference); });
    __syncthreads();
    const int nbins = 1 << pass_bits(pass);
    unsigned long long* rows = hist + (d.group - g0) * int64_t(kTargets) * kRadixBins;
    for (int j = 0; j < kTargets; ++j) {
      if (!own[j]) continue;
      for (int b = threadIdx.x; b < nbins; b += mt::kThreads) {
        const unsigned c = counts[j][b];
        if (c != 0u) {
          atomicAdd(rows + int64_t(j) * kRadixBins + b, static_cast<unsigned long long>(c));
        }
      }
    }
    if (pass == 0) {
      uint32_t flags = 0;
      for (uint32_t bit = 1; bit <= kNanReference; bit <<= 1) {
        if (__syncthreads_or(seen & bit)) flags |= bit;
      }
      if (threadIdx.x == 0 && flags != 0) atomicOr(&s->flags, flags);
    }
  }
};

// One block per group of the batch: narrows every target's bracket to the bin holding its rank,
// clears the histogram rows for the next pass and, after the last pass, sets lo and hi.
struct RadixSelectOp {
  GroupSelect* sel;
  unsigned long long* hist;
  int64_t g0;
  int pass;
  double min_log_range;

  __device__ void operator()(int64_t local) const {
    __shared__ uint32_t next_prefix[kTargets];
    __shared__ int64_t next_rank[kTargets];
    GroupSelect* s = sel + g0 + local;
    // Pass 0 always runs: its counts must be cleared even for groups that score 0.
    if (pass > 0 && !group_valid(s->flags)) return;
    const int bits = pass_bits(pass);
    const int per = (1 << bits) / mt::kThreads;  // bins per thread
    unsigned long long* rows = hist + local * int64_t(kTargets) * kRadixBins;
    for (int j = 0; j < kTargets; ++j) {
      const int64_t rank = s->rank[j];
      if (rank < 0) continue;  // uniform
      const unsigned long long* h = rows + int64_t(s->alias[j]) * kRadixBins;
      const int first = threadIdx.x * per;
      unsigned long long mine = 0;
      for (int b = 0; b < per; ++b) mine += h[first + b];
      if (threadIdx.x == 0) {
        // Unreachable fallback (the bracket always holds rank + 1 keys); keeps indices in range.
        next_prefix[j] = s->prefix[j] << bits;
        next_rank[j] = 0;
      }
      const unsigned long long before = mt::block_exclusive_scan(mine);  // syncs after the write
      const unsigned long long r = static_cast<unsigned long long>(rank);
      if (r >= before && r < before + mine) {  // exactly one thread
        unsigned long long c = before;
        for (int b = 0; b < per; ++b) {
          const unsigned long long n = h[first + b];
          if (r < c + n) {
            next_prefix[j] = (s->prefix[j] << bits) | static_cast<uint32_t>(first + b);
            next_rank[j] = static_cast<int64_t>(r - c);
            break;
          }
          c += n;
        }
      }
    }
    __syncthreads();  // all rows read, all results written
    const int nbins = 1 << bits;
    for (int j = 0; j < kTargets; ++j) {
      if (s->rank[j] < 0 || s->alias[j] != j) continue;
      unsigned long long* row = rows + int64_t(j) * kRadixBins;
      for (int b = threadIdx.x; b < nbins; b += mt::kThreads) row[b] = 0ull;
    }
    __syncthreads();  // the reads of s above come before thread 0 rewrites it
    if (threadIdx.x != 0) return;
    for (int j = 0; j < kTargets; ++j) {
      if (s->rank[j] < 0) continue;
      s->prefix[j] = next_prefix[j];
      s->rank[j] = next_rank[j];
    }
    assign_aliases(*s);
    if (pass + 1 < kRadixPasses || !group_valid(s->flags)) return;
    // All 31 bits are fixed: prefix[j] is the key, i.e. the bits of the order statistic.
    auto value = [&](int j) {
      return log_magnitude(static_cast<double>(__uint_as_float(s->prefix[j])));
    };
    const double a_lo = value(0);
    const double lo = s->rank[1] >= 0 ? lerp_numpy(a_lo, value(1), s->frac_lo) : a_lo;
    const double a_hi = value(2);
    const double q_hi = s->rank[3] >= 0 ? lerp_numpy(a_hi, value(3), s->frac_hi) : a_hi;
    s->lo = lo;
    s->hi = histogram_hi(lo, q_hi, min_log_range);  // Note [Histogram range] (drift/drift_math.h)
  }
};

// Counts rows of a batch: [group - g0][current, reference][bins], 64-bit.
struct BinCountOp {
  const GroupSelect* sel;
  unsigned long long* counts;
  int64_t g0;
  int64_t bins;
  bool in_shared;  // 2 * bins 32-bit counters fit the dynamic shared memory

  __device__ void operator()(const DriftChunk& d, int64_t) const {
    extern __shared__ unsigned bin_counts_smem[];
    const GroupSelect& s = sel[d.group];
    if (!group_valid(s.flags)) return;  // uniform
    const double lo = s.lo, hi = s.hi;
    unsigned long long* rows = counts + (d.group - g0) * 2 * bins;
    if (in_shared) {
      for (int64_t i = threadIdx.x; i < 2 * bins; i += mt::kThreads) bin_counts_smem[i] = 0u;
      __syncthreads();
    }
    auto add = [&](float v, int64_t side) {
      const int64_t b = bin_of(log_magnitude(static_cast<double>(v)), lo, hi, bins);
      if (b < 0) return;
      if (in_shared) {
        atomicAdd(&bin_counts_smem[side * bins + b], 1u);
      } else {
        atomicAdd(rows + side * bins + b, 1ull);
      }
    };
    for_values(d.current, d.bf16, d.n, [&](float v) { add(v, 0); });
    for_values(d.reference, d.bf16, d.n, [&](float v) { add(v, 1); });
    if (in_shared) {
      __syncthreads();
      for (int64_t i = threadIdx.x; i < 2 * bins; i += mt::kThreads) {
        const unsigned c = bin_counts_smem[i];
        if (c != 0u) atomicAdd(rows + i, static_cast<unsigned long long>(c));
      }
    }
  }
};

// One block per group of the batch: 1e-12 per bin, normalise, JS; clears the rows.
struct HistFinishOp {
  const GroupSelect* sel;
  unsigned long long* counts;
  int64_t g0;
  int64_t bins;
  float* out;
  bool base2;

  __device__ void operator()(int64_t local) const {
    const int64_t g = g0 + local;
    if (!group_valid(sel[g].flags)) {  // uniform; its rows were never written
      if (threadIdx.x == 0) out[g] = 0.f;
      return;
    }
    unsigned long long* hc = counts + local * 2 * bins;
    unsigned long long* hr = hc + bins;
    double sc = 0.0, sr = 0.0;
    for (int64_t b = threadIdx.x; b < bins; b += mt::kThreads) {
      sc += static_cast<double>(hc[b]) + 1e-12;
      sr += static_cast<double>(hr[b]) + 1e-12;
    }
    const double nc = mt::block_sum_all(sc);
    const double nr = mt::block_sum_all(sr);
    double js = 0.0;
    for (int64_t b = threadIdx.x; b < bins; b += mt::kThreads) {
      js += js_term<double>((static_cast<double>(hc[b]) + 1e-12) / nc,
                            (static_cast<double>(hr[b]) + 1e-12) / nr);
    }
    js = mt::block_sum(js);  // ends with a barrier: every read above is done
    if (threadIdx.x == 0) out[g] = static_cast<float>(js_distance(js, base2));
    for (int64_t b = threadIdx.x; b < 2 * bins; b += mt::kThreads) hc[b] = 0ull;
  }
};

// Bounds the batch's scratch (radix rows + bin counts), so that any number of groups and bins
// runs in bounded memory; ViT-B's ~600 groups at 64 bins take one batch.
constexpr int64_t kBatchBytes = int64_t(64) << 20;
// BinCountOp counts in dynamic shared memory up to 4096 bins: 2 x 4096 x 4 B = kMaxDynamicSmem
// (Note [Launch resources]); more bins count in global memory.
constexpr int64_t kSharedBinsMax = mt::kMaxDynamicSmem / (2 * sizeof(unsigned));

}  // namespace

void histogram_drift_cuda(const JsDriftArgs& a, int64_t G, int64_t bins, double lower_q,
                          double upper_q, double min_log_range, bool base2,
                          const Tensor& out, cudaStream_t stream) {
  if (G == 0) return;
  const Device device = out.device();
  // bins <= kMaxBins = 2^30: checked for every backend by validate_js_drift (drift/drift_args.cpp).
  const Plan plan = make_plan(a.segments, a.numels, G, kChunk, /*cover_gaps=*/false);
  const StateBases bases = state_bases(a, /*update=*/false);  // read only
  std::vector<DriftChunk> table;
  table.reserve(plan.group_chunks.size());
  for (const int64_t k : mt::group_ordered(plan, /*with_ungrouped=*/false)) {
    const Chunk& c = plan.chunks[k];
    table.push_back(bases.chunk(c, c.group));
  }

  // Ranks as the CPU's log_quantile computes them, over n = 2 * group size values.
  std::vector<int64_t> size(G, 0);
  for (const Segment& s : a.segments) size[s.group] += s.end - s.begin;
  std::vector<GroupSelect> select(G);
  for (int64_t g = 0; g < G; ++g) {
    GroupSelect& s = select[g];
    s = GroupSelect{};
    const int64_t n = 2 * size[g];
    auto target = [&](double q, int j, double& frac) {
      if (n == 0) {
        s.rank[j] = s.rank[j + 1] = -1;
        return;
      }
      const double h = static_cast<double>(n - 1) * q;
      const int64_t i = static_cast<int64_t>(std::floor(h));
      frac = h - static_cast<double>(i);
      s.rank[j] = i;
      s.rank[j + 1] = i + 1 < n ? i + 1 : -1;
    };
    target(lower_q, 0, s.frac_lo);
    target(upper_q, 2, s.frac_hi);
    for (int j = 0; j < kTargets; ++j) s.prefix[j] = 0;
    assign_aliases(s);
  }

  mt::DeviceBundle bundle;
  const int64_t table_at = bundle.add(table);
  const int64_t select_at = bundle.add(select);
  bundle.upload(device);
  const DriftChunk* tbl = bundle.get<DriftChunk>(table_at);
  GroupSelect* sel = bundle.get<GroupSelect>(select_at);

  const int64_t radix_per_group = int64_t(kTargets) * kRadixBins;
  const int64_t per_group = radix_per_group + 2 * bins;  // 64-bit counters
  const int64_t batch = std::clamp<int64_t>(kBatchBytes / (8 * per_group), 1, G);
  // Zeroed once; every kernel that reads rows clears them for the next pass or batch.
  const Tensor scratch = zeros({batch * per_group}, ScalarType::Long, device);
  auto* hist = reinterpret_cast<unsigned long long*>(scratch.mutable_data_ptr<int64_t>());
  auto* counts = hist + batch * radix_per_group;
  const bool in_shared = bins <= kSharedBinsMax;
  const size_t smem = in_shared ? static_cast<size_t>(2 * bins) * sizeof(unsigned) : 0;
  float* o = out.mutable_data_ptr<float>();

  for (int64_t g0 = 0; g0 < G; g0 += batch) {
    const int64_t g1 = std::min(G, g0 + batch);
    // The batch's chunks are one contiguous slice of the table (Note [Group order]).
    const DriftChunk* slice = tbl == nullptr ? nullptr : tbl + plan.group_offsets[g0];
    const int64_t count = plan.group_offsets[g1] - plan.group_offsets[g0];
    for (int pass = 0; pass < kRadixPasses; ++pass) {
      mt::launch_chunks(slice, count, RadixCountOp{sel, hist, g0, pass}, stream);
      mt::launch_groups(g1 - g0, RadixSelectOp{sel, hist, g0, pass, min_log_range}, stream);
    }
    mt::launch_chunks(slice, count, BinCountOp{sel, counts, g0, bins, in_shared}, stream, smem);
    mt::launch_groups(g1 - g0, HistFinishOp{sel, counts, g0, bins, o, base2}, stream);
  }
}

}  // namespace fisheradaptune
