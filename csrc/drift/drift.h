// js_drift, js_mass_totals and js_mass_partial: argument validation shared by the CPU and CUDA
// kernels (drift_args.cpp). Each validate_* function checks every argument (raising before
// anything is written) and returns what the kernels need. The two algorithms of js_drift live
// in their own files: drift_mass_{cpu.cpp,cuda.cu} (mode "mass", and the sharded mass ops) and
// drift_histogram_{cpu.cpp,cuda.cu} (mode "histogram").
#pragma once

#include "common/stable.h"

#include <optional>
#include <string>
#include <vector>

#include "common/plan.h"

namespace fisheradaptune {

enum class DriftMode { kMass, kHistogram };

// js_drift's largest `bins` (2^30), the same on every backend (validate_js_drift).
constexpr int64_t kMaxBins = int64_t(1) << 30;

// Hidden, as the st::Tensor it holds (torch::stable is a hidden namespace): internal to the
// library, never exported.
struct __attribute__((visibility("hidden"))) JsDriftArgs {
  std::vector<Tensor> current;  // contiguous
  std::vector<Tensor> reference;
  std::vector<int64_t> numels;
  std::vector<Segment> segments;
  DriftMode mode = DriftMode::kMass;
};

JsDriftArgs validate_js_drift(const std::vector<Tensor>& current,
                              const std::vector<Tensor>& reference, const Tensor& segments,
                              int64_t num_groups, const std::string& drift_mode, int64_t bins,
                              double lower_q, double upper_q, double min_log_range,
                              std::optional<double> update_reference);

// js_mass_totals (totals undefined) and js_mass_partial: js_drift's checks in mode "mass", and
// totals float64 [2, num_groups] on the tensors' device.
JsDriftArgs validate_js_mass(const char* op, const std::vector<Tensor>& current,
                             const std::vector<Tensor>& reference, const Tensor& segments,
                             int64_t num_groups, const std::optional<Tensor>& totals,
                             std::optional<double> update_reference);

// t itself when it is already contiguous (as at::Tensor::contiguous does), else a contiguous
// copy: st::contiguous always goes through the dispatcher (an operator looked up by name), which
// cost about 0.3 us per tensor of a list.
inline Tensor as_contiguous(const Tensor& t) {
  return t.is_contiguous() ? t : st::contiguous(t);
}

// The data pointers of a validated list (every tensor of dtype S), read once per pass and never
// inside a parallel region: each read is a call into libtorch. Untyped reads, since validation
// has checked the dtype already (a typed read checks it again, one more call per tensor).
template <typename S>
std::vector<const S*> const_ptrs(const std::vector<Tensor>& list) {
  std::vector<const S*> out;
  out.reserve(list.size());
  for (const Tensor& t : list) out.push_back(static_cast<const S*>(t.const_data_ptr()));
  return out;
}
template <typename S>
std::vector<S*> mutable_ptrs(const std::vector<Tensor>& list) {
  std::vector<S*> out;
  out.reserve(list.size());
  for (const Tensor& t : list) out.push_back(static_cast<S*>(t.mutable_data_ptr()));
  return out;
}

}  // namespace fisheradaptune
