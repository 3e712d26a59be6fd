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

#include <cuda_runtime.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "common/multi_tensor.cuh"
#include "drift/drift.h"

namespace fisheradaptune {

// Current and reference share shapes, so one descriptor covers both.
struct DriftChunk {
  const float* current;  // offset to the chunk's first element
  float* reference;
  int64_t n;
  int64_t group;  // -1: in no group (only the reference update visits it)
};

__device__ __forceinline__ float4 load4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}

// Visits the values of one array (histogram passes treat the two snapshots separately, so each
// aligns on its own).
template <typename Body>
__device__ __forceinline__ void for_values(const float* p, int64_t n, Body&& body) {
  const int64_t head = mt::aligned_head(n, 4, p, 4);
  mt::split_loop<4>(
      n, head, [&](int64_t i) { body(p[i]); },
      [&](int64_t i) {
        const float4 v = load4(p + i);
        body(v.x);
        body(v.y);
        body(v.z);
        body(v.w);
      });
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

// The reference pointers of a chunk table (DriftChunk::reference): write access only for a call
// that updates the reference, the only case in which a kernel writes through them.
inline std::vector<float*> reference_ptrs(const JsDriftArgs& a, bool update) {
  if (update) return mutable_ptrs<float>(a.reference);
  std::vector<float*> out;
  out.reserve(a.reference.size());
  for (const float* p : const_ptrs<float>(a.reference)) out.push_back(const_cast<float*>(p));
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
