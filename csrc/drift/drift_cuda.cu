// CUDA kernel of js_drift: validates, then runs the mode's algorithm (drift_cuda.cuh).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/multi_tensor.cuh"
#include "drift/drift.h"
#include "drift/drift_cuda.cuh"

namespace fisheradaptune {
namespace {

at::Tensor js_drift_cuda(at::TensorList current, at::TensorList reference,
                         const at::Tensor& segments, int64_t num_groups,
                         c10::string_view drift_mode, int64_t bins, double lower_q,
                         double upper_q, double min_log_range, bool base2,
                         std::optional<double> update_reference) {
  mt::check_not_capturing("js_drift", "it uploads per-call chunk tables from pinned host memory",
                          current.empty() ? segments : current[0]);
  const JsDriftArgs a =
      validate_js_drift(current, reference, segments, num_groups, drift_mode, bins, lower_q,
                        upper_q, min_log_range, update_reference);
  // The device validate_js_drift checked every tensor against.
  const c10::Device device = current.empty() ? segments.device() : current[0].device();
  TORCH_CHECK(device.is_cuda(), "fisheradaptune.js_drift: the CUDA kernel got tensors on ",
              device);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty({num_groups}, at::TensorOptions().dtype(at::kFloat).device(device));
  // Validation admits only float32 state on CUDA, and current shares reference's dtype.
  if (a.mode == DriftMode::kMass) {
    mass_drift_cuda(a, num_groups, update_reference, base2, out, stream);
  } else {
    histogram_drift_cuda(a, num_groups, bins, lower_q, upper_q, min_log_range, base2, out, stream);
    // After scoring, on the same stream.
    if (update_reference) update_reference_cuda(a, *update_reference, device, stream);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fisheradaptune, CUDA, m) {
  m.impl("js_drift", &js_drift_cuda);
}

}  // namespace fisheradaptune
