// js_drift, js_mass_totals and js_mass_partial: argument validation shared by the CPU and CUDA
// kernels (drift_args.cpp). Each validate_* function checks every argument (raising before
// anything is written) and returns what the kernels need. The two algorithms of js_drift live
// in their own files: drift_mass_{cpu.cpp,cuda.cu} (mode "mass", and the sharded mass ops) and
// drift_histogram_{cpu.cpp,cuda.cu} (mode "histogram").
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "plan.h"

namespace fisheradaptune {

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

}  // namespace fisheradaptune
