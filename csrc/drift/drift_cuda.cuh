// js_drift on CUDA (docs/methods.md section 3; semantics: the CPU kernels drift/drift_*_cpu.cpp):
// what its kernel (drift_cuda.cu) and the two algorithms' files share (drift_mass_cuda.cu: mode
// "mass" and the sharded mass ops; drift_histogram_cuda.cu: mode "histogram"). Every pass is one
// launch over all groups' chunks (a block knows its chunk's group), never one per group, and
// nothing is read back to the host: with CPU segments (what the Python wrappers pass) the call is
// asynchronous (Note [Segments on the host], common/validate.h). The chunk tables are uploaded
// from pinned host memory, so the ops refuse CUDA-graph capture (Note [No CUDA-graph capture],
// common/multi_tensor.cuh).
#pragma once

#include "common/stable.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "common/multi_tensor.cuh"
#include "common/vec16.cuh"
#include "drift/drift.h"

namespace fisheradaptune {

// Current and reference share shapes and dtype, so one descriptor covers both.
struct DriftChunk {
  const void* current;  // offset to the chunk's first element (float or __nv_bfloat16)
  void* reference;
  int64_t n;
  int64_t group;  // -1: in no group (only the reference update visits it)
  int64_t bf16;   // 1: bfloat16 state (Note [bfloat16 state], common/state.h), 0: float
};

// Note [bfloat16 state] on CUDA: the kernels are written once over S = float or __nv_bfloat16;
// values are read widened to float (exact), every computation is that of float32 state, and a
// written reference is rounded once to bfloat16 (__float2bfloat16_rn, round to nearest even, as
// the CPU's conversion): to_float, store_rn, load16 and store16 (common/vec16.cuh). Vectors are 16
// bytes: 4 floats or 8 bfloat16.

// Visits the values of one array (histogram passes treat the two snapshots separately, so each
// aligns on its own), widened to float.
template <typename S, typename Body>
__device__ __forceinline__ void for_values_of(const S* p, int64_t n, Body&& body) {
  constexpr int kVec = 16 / sizeof(S);
  const int64_t head = mt::aligned_head(n, kVec, p, sizeof(S));
  mt::split_loop<kVec>(
      n, head, [&](int64_t i) { body(to_float(p[i])); },
      [&](int64_t i) {
        float v[kVec];
        load16(p + i, v);
#pragma unroll
        for (int q = 0; q < kVec; ++q) body(v[q]);
      });
}
template <typename Body>
__device__ __forceinline__ void for_values(const void* p, int64_t bf16, int64_t n, Body&& body) {
  if (bf16) {  // uniform over the block
    for_values_of(static_cast<const __nv_bfloat16*>(p), n, body);
  } else {
    for_values_of(static_cast<const float*>(p), n, body);
  }
}

// The tensor whose device the op runs on, the one validation checked every tensor against
// (validate_js_drift, validate_js_mass): current[0], or segments for empty lists. Dispatch
// reaches a CUDA kernel only with some CUDA tensor, and validation then names any tensor on
// another device, so the check is an invariant (RuntimeError).
inline const Tensor& cuda_anchor(const char* op, const std::vector<Tensor>& current,
                                 const Tensor& segments) {
  const Tensor& on = current.empty() ? segments : current[0];
  FAT_CHECK_RUNTIME(on.is_cuda(), "fisheradaptune.", op, ": the CUDA kernel got tensors on ",
                    on.device());
  return on;
}

// The byte bases of a call's tensors, for chunk tables. The reference pointers
// (DriftChunk::reference) have write access only for a call that updates the reference, the
// only case in which a kernel writes through them. Validation admits float32 and bfloat16 state
// on CUDA (float64 is CPU-only), current sharing reference's dtype, every reference one dtype.
struct StateBases {
  std::vector<const char*> current;
  std::vector<char*> reference;
  int64_t element_size = 4;
  int64_t bf16 = 0;

  DriftChunk chunk(const Chunk& c, int64_t group) const {
    const int64_t at = c.begin * element_size;
    return DriftChunk{current[c.tensor] + at, reference[c.tensor] + at, c.end - c.begin, group,
                      bf16};
  }
};

inline StateBases state_bases(const JsDriftArgs& a, bool update) {
  StateBases out;
  if (!a.reference.empty()) {
    out.bf16 = a.reference[0].scalar_type() == ScalarType::BFloat16 ? 1 : 0;
    out.element_size = out.bf16 ? 2 : 4;
  }
  for (const void* p : const_ptrs<void>(a.current)) {
    out.current.push_back(static_cast<const char*>(p));
  }
  if (update) {
    for (void* p : mutable_ptrs<void>(a.reference)) out.reference.push_back(static_cast<char*>(p));
  } else {
    for (const void* p : const_ptrs<void>(a.reference)) {
      out.reference.push_back(const_cast<char*>(static_cast<const char*>(p)));
    }
  }
  return out;
}

// Mode "mass": out[g] = the distance of group g (float32 [num_groups] on the device). With rho,
// the reference update is fused into the scoring pass (every element, after it is read).
void mass_drift_cuda(const JsDriftArgs& a, int64_t num_groups, std::optional<double> rho,
                     bool base2, const Tensor& out, cudaStream_t stream);

// reference = rho * reference + (1 - rho) * current over every element, bitwise the CPU's
// (drift_mass_cuda.cu, EmaOp); the histogram mode's update, after it has scored every group.
void update_reference_cuda(const JsDriftArgs& a, double rho, const Device& device,
                           cudaStream_t stream);

// Mode "histogram": out[g] = the distance of group g; reads the reference only.
void histogram_drift_cuda(const JsDriftArgs& a, int64_t num_groups, int64_t bins,
                          double lower_q, double upper_q, double min_log_range, bool base2,
                          const Tensor& out, cudaStream_t stream);

}  // namespace fisheradaptune
