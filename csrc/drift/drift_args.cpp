#include "common/validate.h"

#include <cmath>

#include "drift/drift.h"
#include "common/state.h"

namespace fisheradaptune {

namespace {

// The checks js_drift and the sharded mass ops share: two lists of like tensors and a layout.
void check_drift_lists(const char* op, const std::vector<Tensor>& current,
                       const std::vector<Tensor>& reference, const Tensor& segments,
                       int64_t num_groups, std::optional<double> update_reference,
                       JsDriftArgs& out) {
  check_same_length(op, "current", current.size(), "reference", reference.size());
  FAT_CHECK_VALUE(num_groups >= 0, op, "num_groups", "expected >= 0, got ", num_groups);
  if (update_reference.has_value()) {
    check_coefficient(op, "update_reference", *update_reference, "a decay", 1.0);
  }
  const Device device =
      segments.is_cpu() && !current.empty() ? current[0].device() : segments.device();
  // float32, bfloat16 (Note [bfloat16 state], common/state.h) or float64 on the CPU.
  out.numels = check_fisher_state_list(op, "reference", reference, device);
  // Each dtype read once (a call into libtorch per read).
  std::vector<ScalarType> dtypes;
  dtypes.reserve(reference.size());
  for (const Tensor& r : reference) dtypes.push_back(r.scalar_type());
  for (size_t i = 0; i < current.size(); ++i) {
    const std::string where = item_name("current", i);
    check_device(op, where, current[i], device);
    check_same_shape(op, where, current[i], reference[i]);
    const ScalarType dtype = current[i].scalar_type();
    FAT_CHECK_VALUE(dtype == dtypes[i], op, where, "expected the dtype of reference[", i, "] (",
                    dtypes[i], "), got ", dtype);
    out.current.push_back(as_contiguous(current[i]));
  }
  for (size_t i = 1; i < reference.size(); ++i) {
    FAT_CHECK_VALUE(dtypes[i] == dtypes[0], op, item_name("reference", i),
                    "expected every tensor to share the dtype of reference[0] (", dtypes[0],
                    "), got ", dtypes[i]);
  }
  out.reference = reference;
  out.segments = read_segments(op, "segments", segments, out.numels, num_groups);
}

// Note [Aliasing]: only an update writes (the reference list); the current snapshots (as the
// kernels read them) and js_mass_partial's totals are read while it runs. Without an update
// nothing is written and any sharing is fine (e.g. current and reference the same tensors).
void check_drift_aliasing(const char* op, const JsDriftArgs& a,
                          std::optional<double> update_reference, const Tensor* totals) {
  if (!update_reference.has_value()) return;
  std::vector<MemoryArg> mem;
  mem.reserve(2 * a.reference.size() + 1);
  // In the schema's argument order, so that an error names the later of the two.
  for (size_t i = 0; i < a.current.size(); ++i) {
    mem.push_back({&a.current[i], item_name("current", i), false});
  }
  for (size_t i = 0; i < a.reference.size(); ++i) {
    mem.push_back({&a.reference[i], item_name("reference", i), true});
  }
  if (totals != nullptr) mem.push_back({totals, "totals", false});
  check_no_aliasing(op, mem);
}

}  // namespace

JsDriftArgs validate_js_drift(const std::vector<Tensor>& current,
                              const std::vector<Tensor>& reference, const Tensor& segments,
                              int64_t num_groups, const std::string& drift_mode, int64_t bins,
                              double lower_q, double upper_q, double min_log_range,
                              std::optional<double> update_reference) {
  constexpr const char* op = "js_drift";
  JsDriftArgs out;
  if (drift_mode == "mass") {
    out.mode = DriftMode::kMass;
  } else if (drift_mode == "histogram") {
    out.mode = DriftMode::kHistogram;
  } else {
    FAT_CHECK_VALUE(false, op, "drift_mode", "expected \"mass\" or \"histogram\", got \"",
                    drift_mode, "\"");
  }
  // One bound on every backend: the CUDA kernels count bins in 32-bit shared-memory slots and
  // index 2 * bins of them in int32; without a bound, bins = 2^31 on the CPU allocated two
  // 16 GiB count arrays and had the process killed for memory instead of raising.
  FAT_CHECK_VALUE(bins >= 2 && bins <= kMaxBins, op, "bins", "expected 2 <= bins <= 2^30, got ",
                  bins);
  FAT_CHECK_VALUE(0.0 <= lower_q && lower_q < upper_q && upper_q <= 1.0, op,
                  "lower_q/upper_q", "expected 0 <= lower_q < upper_q <= 1, got ", lower_q,
                  " and ", upper_q);
  FAT_CHECK_VALUE(std::isfinite(min_log_range) && min_log_range > 0, op, "min_log_range",
                  "expected a finite number > 0, got ", min_log_range);
  check_drift_lists(op, current, reference, segments, num_groups, update_reference, out);
  check_drift_aliasing(op, out, update_reference, nullptr);
  return out;
}

JsDriftArgs validate_js_mass(const char* op, const std::vector<Tensor>& current,
                             const std::vector<Tensor>& reference, const Tensor& segments,
                             int64_t num_groups, const std::optional<Tensor>& totals,
                             std::optional<double> update_reference) {
  JsDriftArgs out;
  check_drift_lists(op, current, reference, segments, num_groups, update_reference, out);
  if (totals.has_value()) {
    const Tensor& t = *totals;
    const Device device = current.empty() ? segments.device() : current[0].device();
    FAT_CHECK_VALUE(t.scalar_type() == ScalarType::Double, op, "totals",
                    "expected float64, got ", t.scalar_type());
    FAT_CHECK_VALUE(t.dim() == 2 && t.size(0) == 2 && t.size(1) == num_groups, op, "totals",
                    "expected shape [2, ", num_groups, "], got ", t.sizes());
    check_device(op, "totals", t, device);
  }
  check_drift_aliasing(op, out, update_reference, totals.has_value() ? &*totals : nullptr);
  return out;
}

}  // namespace fisheradaptune
