#include "common/validate.h"

#include "fisher/fisher_accumulate.h"
#include "common/state.h"

namespace fisheradaptune {

FisherAccumulateArgs validate_fisher_accumulate(
    const std::vector<Tensor>& fisher, const std::vector<std::optional<Tensor>>& grads,
    double decay, double scale, const std::optional<Tensor>& segments, const Tensor& group_sums,
    const Tensor& nonfinite) {
  constexpr const char* op = "fisher_accumulate_";
  check_same_length(op, "fisher", fisher.size(), "grads", grads.size());
  check_coefficient(op, "decay", decay);  // Note [Coefficients]
  check_coefficient(op, "scale", scale);
  // The outputs decide the device, so that empty lists still have one.
  const Device device = nonfinite.device();
  FAT_CHECK_VALUE(nonfinite.scalar_type() == ScalarType::Long, op, "nonfinite",
                  "expected int64, got ", nonfinite.scalar_type());
  FAT_CHECK_VALUE(nonfinite.numel() == 1, op, "nonfinite", "expected one element, got ",
                  nonfinite.numel());
  check_device(op, "group_sums", group_sums, device);
  FAT_CHECK_VALUE(group_sums.scalar_type() == ScalarType::Float, op, "group_sums",
                  "expected float32, got ", group_sums.scalar_type());
  FAT_CHECK_VALUE(group_sums.dim() == 1 && group_sums.is_contiguous(), op, "group_sums",
                  "expected a contiguous 1-D tensor, got shape ", group_sums.sizes());

  FisherAccumulateArgs out;
  out.numels = check_fisher_state_list(op, "fisher", fisher, device);  // Note [bfloat16 state]
  out.fisher.assign(fisher.begin(), fisher.end());
  out.grads.resize(fisher.size());
  for (size_t i = 0; i < fisher.size(); ++i) {
    const std::optional<Tensor>& g = grads[i];
    if (!g.has_value() || !g->defined()) continue;
    const std::string where = item_name("grads", i);
    check_device(op, where, *g, device);
    check_same_shape(op, where, *g, fisher[i]);
    check_grad_dtype(op, where, *g, fisher[i]);
    // A contiguous gradient is read in place (no dispatcher call).
    out.grads[i] = g->is_contiguous() ? *g : as_contiguous(*g);
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

}  // namespace fisheradaptune
