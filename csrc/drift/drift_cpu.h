// js_drift's CPU algorithms, one file each, called by js_drift's CPU kernel (drift_cpu.cpp):
// mode "mass" in drift_mass_cpu.cpp (with the sharded ops js_mass_totals / js_mass_partial),
// mode "histogram" in drift_histogram_cpu.cpp. Each dispatches on the state dtype itself.
// Reductions are per chunk and then per group in plan order, so results do not depend on the
// thread count.
#pragma once

#include "common/stable.h"

#include <cstdint>
#include <optional>

#include "drift/drift.h"

namespace fisheradaptune {

// The dtype of the state (float32 for empty lists); current shares it (validate_js_drift).
inline ScalarType state_dtype(const JsDriftArgs& a) {
  return a.reference.empty() ? ScalarType::Float : a.reference[0].scalar_type();
}

// Mode "mass": out[g] = the distance of group g. With rho, the reference update is fused into
// the scoring pass (every element, after it is read).
void mass_drift_cpu(const JsDriftArgs& a, int64_t num_groups, std::optional<double> rho,
                    bool base2, float* out);

// reference = rho * reference + (1 - rho) * current over every element, rounded as the mass
// pass's fused update (drift_mass_cpu.cpp, ema_chunk); the histogram mode's update, after it has
// scored every group.
void update_reference_cpu(const JsDriftArgs& a, double rho);

// Mode "histogram": out[g] = the distance of group g; reads the reference only.
void histogram_drift_cpu(const JsDriftArgs& a, int64_t num_groups, int64_t bins, double lower_q,
                         double upper_q, double min_log_range, bool base2, float* out);

}  // namespace fisheradaptune
