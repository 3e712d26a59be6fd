// CPU kernel of js_drift (docs/methods.md section 3): validates, then runs the mode's algorithm
// (drift_cpu.h).
#include "common/stable.h"

#include <optional>
#include <string>
#include <vector>

#include "drift/drift.h"
#include "drift/drift_cpu.h"

namespace fisheradaptune {
namespace {

Tensor js_drift_cpu(const std::vector<Tensor>& current, const std::vector<Tensor>& reference,
                    const Tensor& segments, int64_t num_groups, const std::string& drift_mode,
                    int64_t bins, double lower_q, double upper_q, double min_log_range,
                    bool base2, std::optional<double> update_reference) {
  const JsDriftArgs a =
      validate_js_drift(current, reference, segments, num_groups, drift_mode, bins, lower_q,
                        upper_q, min_log_range, update_reference);
  Tensor out = empty({num_groups}, ScalarType::Float, cpu_device());
  float* o = out.mutable_data_ptr<float>();
  if (a.mode == DriftMode::kMass) {
    mass_drift_cpu(a, num_groups, update_reference, base2, o);
  } else {
    histogram_drift_cpu(a, num_groups, bins, lower_q, upper_q, min_log_range, base2, o);
    if (update_reference) update_reference_cpu(a, *update_reference);
  }
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fisheradaptune, CPU, m) {
  m.impl("js_drift", TORCH_BOX(&js_drift_cpu));
}

}  // namespace fisheradaptune
