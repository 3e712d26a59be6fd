// CPU kernel of js_drift (docs/methods.md section 3): validates, then runs the mode's algorithm
// (drift_cpu.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "drift/drift.h"
#include "drift/drift_cpu.h"

namespace fisheradaptune {
namespace {

at::Tensor js_drift_cpu(at::TensorList current, at::TensorList reference,
                        const at::Tensor& segments, int64_t num_groups,
                        c10::string_view drift_mode, int64_t bins, double lower_q,
                        double upper_q, double min_log_range, bool base2,
                        std::optional<double> update_reference) {
  const JsDriftArgs a =
      validate_js_drift(current, reference, segments, num_groups, drift_mode, bins, lower_q,
                        upper_q, min_log_range, update_reference);
  at::Tensor out = at::empty({num_groups}, segments.options().dtype(at::kFloat).device(at::kCPU));
  float* o = out.data_ptr<float>();
  if (a.mode == DriftMode::kMass) {
    mass_drift_cpu(a, num_groups, update_reference, base2, o);
  } else {
    histogram_drift_cpu(a, num_groups, bins, lower_q, upper_q, min_log_range, base2, o);
    if (update_reference) update_reference_cpu(a, *update_reference);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fisheradaptune, CPU, m) {
  m.impl("js_drift", &js_drift_cpu);
}

}  // namespace fisheradaptune
