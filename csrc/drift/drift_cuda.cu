// CUDA kernel of js_drift: validates, then runs the mode's algorithm (drift_cuda.cuh).
#include "common/stable.h"

#include <optional>
#include <string>
#include <vector>

#include "common/multi_tensor.cuh"
#include "drift/drift.h"
#include "drift/drift_cuda.cuh"

namespace fisheradaptune {
namespace {

Tensor js_drift_cuda(const std::vector<Tensor>& current, const std::vector<Tensor>& reference,
                     const Tensor& segments, int64_t num_groups, const std::string& drift_mode,
                     int64_t bins, double lower_q, double upper_q, double min_log_range,
                     bool base2, std::optional<double> update_reference) {
  mt::check_not_capturing("js_drift", "it uploads per-call chunk tables from pinned host memory",
                          current.empty() ? segments : current[0]);
  const JsDriftArgs a =
      validate_js_drift(current, reference, segments, num_groups, drift_mode, bins, lower_q,
                        upper_q, min_log_range, update_reference);
  // The device validate_js_drift checked every tensor against.
  const Tensor& on = cuda_anchor("js_drift", current, segments);
  const Device device = on.device();
  const mt::TensorDeviceGuard guard(on);
  const cudaStream_t stream = mt::current_stream(on.get_device_index());
  Tensor out = empty({num_groups}, ScalarType::Float, device);
  // Validation admits float32 and bfloat16 state on CUDA, and current shares reference's dtype.
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

STABLE_TORCH_LIBRARY_IMPL(fisheradaptune, CUDA, m) {
  m.impl("js_drift", TORCH_BOX(&js_drift_cuda));
}

}  // namespace fisheradaptune
