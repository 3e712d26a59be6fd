// Per-op argument validation shared by the CPU and CUDA kernels: each validate_* function checks
// every argument (raising before anything is written) and returns what the kernels need.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>

#include <optional>
#include <string>
#include <vector>

#include "plan.h"

namespace fisheradaptune {

// Dense lists after validation. grads[i] is undefined where the caller passed None.
struct FisherAccumulateArgs {
  std::vector<at::Tensor> fisher;
  std::vector<at::Tensor> grads;  // contiguous, or undefined
  std::vector<int64_t> numels;
  std::vector<Segment> segments;
  int64_t num_groups = 0;
};

FisherAccumulateArgs validate_fisher_accumulate(
    at::TensorList fisher, const c10::List<std::optional<at::Tensor>>& grads, double decay,
    double scale, const std::optional<at::Tensor>& segments, const at::Tensor& group_sums,
    const at::Tensor& nonfinite);

enum class DriftMode { kMass, kHistogram };

// js_drift's largest `bins` (2^30), the same on every backend (validate_js_drift).
constexpr int64_t kMaxBins = int64_t(1) << 30;

struct JsDriftArgs {
  std::vector<at::Tensor> current;  // contiguous
  std::vector<at::Tensor> reference;
  std::vector<int64_t> numels;
  std::vector<Segment> segments;
  DriftMode mode = DriftMode::kMass;
};

JsDriftArgs validate_js_drift(at::TensorList current, at::TensorList reference,
                              const at::Tensor& segments, int64_t num_groups,
                              c10::string_view drift_mode, int64_t bins, double lower_q,
                              double upper_q, double min_log_range,
                              std::optional<double> update_reference);

// js_mass_totals (totals undefined) and js_mass_partial: js_drift's checks in mode "mass", and
// totals float64 [2, num_groups] on the tensors' device.
JsDriftArgs validate_js_mass(const char* op, at::TensorList current, at::TensorList reference,
                             const at::Tensor& segments, int64_t num_groups,
                             const std::optional<at::Tensor>& totals,
                             std::optional<double> update_reference);

// nonfinite: int64, one element, on fisher's device (Note [Skipping in per_sample_grad_sq_],
// per_sample.cpp).
void validate_per_sample_grad_sq(const at::Tensor& fisher, const at::Tensor& x,
                                 const at::Tensor& grad_out, double scale,
                                 const at::Tensor& nonfinite);

}  // namespace fisheradaptune
