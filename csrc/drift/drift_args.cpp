#include "args.h"

#include "validate.h"

namespace fisheradaptune {

namespace {

// Common to every op over a list of state tensors: same device, state dtype, contiguous.
std::vector<int64_t> check_state_list(const char* op, const char* arg, at::TensorList list,
                                      const c10::Device& device) {
  std::vector<int64_t> numels;
  numels.reserve(list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const std::string where = item_name(arg, i);
    check_device(op, where, list[i], device);
    check_state(op, where, list[i]);
    numels.push_back(list[i].numel());
  }
  return numels;
}

}  // namespace

FisherAccumulateArgs validate_fisher_accumulate(
    at::TensorList fisher, const c10::List<std::optional<at::Tensor>>& grads, double decay,
    double scale, const std::optional<at::Tensor>& segments, const at::Tensor& group_sums,
    const at::Tensor& nonfinite) {
  constexpr const char* op = "fisher_accumulate_";
  check_same_length(op, "fisher", fisher.size(), "grads", grads.size());
  check_coefficient(op, "decay", decay);  // Note [Coefficients]
  check_coefficient(op, "scale", scale);
  // The outputs decide the device, so that empty lists still have one.
  const c10::Device device = nonfinite.device();
  FAT_CHECK_TYPE(nonfinite.scalar_type() == at::kLong, op, "nonfinite", "expected int64, got ",
                 nonfinite.scalar_type());
  FAT_CHECK_VALUE(nonfinite.numel() == 1, op, "nonfinite", "expected one element, got ",
                  nonfinite.numel());
  check_device(op, "group_sums", group_sums, device);
  FAT_CHECK_TYPE(group_sums.scalar_type() == at::kFloat, op, "group_sums",
                 "expected float32, got ", group_sums.scalar_type());
  FAT_CHECK_VALUE(group_sums.dim() == 1 && group_sums.is_contiguous(), op, "group_sums",
                  "expected a contiguous 1-D tensor, got shape ", group_sums.sizes());

  FisherAccumulateArgs out;
  out.numels = check_state_list(op, "fisher", fisher, device);
  out.fisher.assign(fisher.begin(), fisher.end());
  out.grads.resize(fisher.size());
  for (size_t i = 0; i < fisher.size(); ++i) {
    const std::optional<at::Tensor> g = grads.get(i);
    if (!g.has_value() || !g->defined()) continue;
    const std::string where = item_name("grads", i);
    check_device(op, where, *g, device);
    check_same_shape(op, where, *g, fisher[i]);
    check_grad_dtype(op, where, *g, fisher[i]);
    out.grads[i] = g->contiguous();
  }
  out.num_groups = group_sums.numel();
  if (segments.has_value() && segments->defined()) {
    out.segments = read_segments(op, "segments", *segments, out.numels, out.num_groups);
  } else {
    FAT_CHECK_VALUE(out.num_groups == 0, op, "group_sums",
                    "expected an empty tensor when no segments are given, got ",
                    out.num_groups, " elements");
  }
  // Note [Aliasing]: every Fisher tensor and both outputs are written; the gradients are read
  // in place (out.grads, after the copy of a non-contiguous one). In the schema's argument
  // order, so that an error names the later of the two.
  std::vector<MemoryArg> mem;
  mem.reserve(2 * fisher.size() + 2);
  for (size_t i = 0; i < fisher.size(); ++i) {
    mem.push_back({&out.fisher[i], item_name("fisher", i), true});
  }
  for (size_t i = 0; i < fisher.size(); ++i) {
    mem.push_back({&out.grads[i], item_name("grads", i), false});
  }
  mem.push_back({&group_sums, "group_sums", true});
  mem.push_back({&nonfinite, "nonfinite", true});
  check_no_aliasing(op, mem);
  return out;
}

namespace {

// The checks js_drift and the sharded mass ops share: two lists of like tensors and a layout.
void check_drift_lists(const char* op, at::TensorList current, at::TensorList reference,
                       const at::Tensor& segments, int64_t num_groups,
                       std::optional<double> update_reference, JsDriftArgs& out) {
  check_same_length(op, "current", current.size(), "reference", reference.size());
  FAT_CHECK_VALUE(num_groups >= 0, op, "num_groups", "expected >= 0, got ", num_groups);
  if (update_reference.has_value()) {
    check_coefficient(op, "update_reference", *update_reference, "a decay", 1.0);
  }
  const c10::Device device = segments.device().is_cpu() && !current.empty()
                                 ? current[0].device()
                                 : segments.device();
  out.numels = check_state_list(op, "reference", reference, device);
  for (size_t i = 0; i < current.size(); ++i) {
    const std::string where = item_name("current", i);
    check_device(op, where, current[i], device);
    check_same_shape(op, where, current[i], reference[i]);
    FAT_CHECK_TYPE(current[i].scalar_type() == reference[i].scalar_type(), op, where,
                   "expected the dtype of reference[", i, "] (", reference[i].scalar_type(),
                   "), got ", current[i].scalar_type());
    out.current.push_back(current[i].contiguous());
  }
  for (size_t i = 1; i < reference.size(); ++i) {
    FAT_CHECK_TYPE(reference[i].scalar_type() == reference[0].scalar_type(), op,
                   item_name("reference", i), "expected every tensor to share the dtype of ",
                   "reference[0] (", reference[0].scalar_type(), "), got ",
                   reference[i].scalar_type());
  }
  out.reference.assign(reference.begin(), reference.end());
  out.segments = read_segments(op, "segments", segments, out.numels, num_groups);
}

// Note [Aliasing]: only an update writes (the reference list); the current snapshots (as the
// kernels read them) and js_mass_partial's totals are read while it runs. Without an update
// nothing is written and any sharing is fine (e.g. current and reference the same tensors).
void check_drift_aliasing(const char* op, const JsDriftArgs& a,
                          std::optional<double> update_reference, const at::Tensor* totals) {
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

JsDriftArgs validate_js_drift(at::TensorList current, at::TensorList reference,
                              const at::Tensor& segments, int64_t num_groups,
                              c10::string_view drift_mode, int64_t bins, double lower_q,
                              double upper_q, double min_log_range,
                              std::optional<double> update_reference) {
  constexpr const char* op = "js_drift";
  JsDriftArgs out;
  if (drift_mode == "mass") {
    out.mode = DriftMode::kMass;
  } else if (drift_mode == "histogram") {
    out.mode = DriftMode::kHistogram;
  } else {
    FAT_CHECK_VALUE(false, op, "drift_mode", "expected \"mass\" or \"histogram\", got \"",
                    std::string(drift_mode), "\"");
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

JsDriftArgs validate_js_mass(const char* op, at::TensorList current, at::TensorList reference,
                             const at::Tensor& segments, int64_t num_groups,
                             const std::optional<at::Tensor>& totals,
                             std::optional<double> update_reference) {
  JsDriftArgs out;
  check_drift_lists(op, current, reference, segments, num_groups, update_reference, out);
  if (totals.has_value()) {
    const at::Tensor& t = *totals;
    const c10::Device device = current.empty() ? segments.device() : current[0].device();
    FAT_CHECK_TYPE(t.scalar_type() == at::kDouble, op, "totals", "expected float64, got ",
                   t.scalar_type());
    FAT_CHECK_VALUE(t.dim() == 2 && t.size(0) == 2 && t.size(1) == num_groups, op, "totals",
                    "expected shape [2, ", num_groups, "], got ", t.sizes());
    check_device(op, "totals", t, device);
  }
  check_drift_aliasing(op, out, update_reference, totals.has_value() ? &*totals : nullptr);
  return out;
}

void validate_per_sample_grad_sq(const at::Tensor& fisher, const at::Tensor& x,
                                 const at::Tensor& grad_out, double scale,
                                 const at::Tensor& nonfinite) {
  constexpr const char* op = "per_sample_grad_sq_";
  check_coefficient(op, "scale", scale);  // Note [Coefficients]
  check_state(op, "fisher", fisher);
  check_device(op, "nonfinite", nonfinite, fisher.device());
  FAT_CHECK_TYPE(nonfinite.scalar_type() == at::kLong, op, "nonfinite", "expected int64, got ",
                 nonfinite.scalar_type());
  FAT_CHECK_VALUE(nonfinite.numel() == 1, op, "nonfinite", "expected one element, got ",
                  nonfinite.numel());
  check_device(op, "x", x, fisher.device());
  check_device(op, "grad_out", grad_out, fisher.device());
  FAT_CHECK_VALUE(x.dim() == 3, op, "x", "expected [N, T, in_features], got shape ", x.sizes());
  FAT_CHECK_VALUE(grad_out.dim() == 3, op, "grad_out",
                  "expected [N, T, out_features], got shape ", grad_out.sizes());
  FAT_CHECK_VALUE(grad_out.size(0) == x.size(0) && grad_out.size(1) == x.size(1), op,
                  "grad_out", "expected the same N and T as x ", x.sizes(), ", got ",
                  grad_out.sizes());
  FAT_CHECK_VALUE(fisher.dim() == 2 && fisher.size(0) == grad_out.size(2) &&
                      fisher.size(1) == x.size(2),
                  op, "fisher", "expected shape [", grad_out.size(2), ", ", x.size(2),
                  "] (out_features, in_features), got ", fisher.sizes());
  check_grad_dtype(op, "x", x, fisher);
  FAT_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), op, "grad_out",
                 "expected the dtype of x (", x.scalar_type(), "), got ",
                 grad_out.scalar_type());
  // Note [Aliasing]: the GEMMs read x and grad_out in place (strided), fisher and the count
  // are written.
  check_no_aliasing(op, {{&fisher, "fisher", true},
                         {&x, "x", false},
                         {&grad_out, "grad_out", false},
                         {&nonfinite, "nonfinite", true}});
}

}  // namespace fisheradaptune
