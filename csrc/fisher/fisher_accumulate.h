// fisher_accumulate_: argument validation shared by the CPU and CUDA kernels
// (fisher_accumulate_args.cpp). The update and Note [Skipping]: fisher_accumulate_cpu.cpp.
#pragma once

#include "common/stable.h"

#include <optional>
#include <vector>

#include "common/plan.h"

namespace fisheradaptune {

// Dense lists after validation. grads[i] is undefined where the caller passed None.
// Hidden like the stable Tensor it holds (torch declares it in a hidden namespace; a visible
// struct with a hidden field draws -Wattributes).
struct C10_HIDDEN FisherAccumulateArgs {
  std::vector<Tensor> fisher;
  std::vector<Tensor> grads;  // contiguous, or undefined
  std::vector<int64_t> numels;
  std::vector<Segment> segments;
  int64_t num_groups = 0;
};

FisherAccumulateArgs validate_fisher_accumulate(
    const std::vector<Tensor>& fisher, const std::vector<std::optional<Tensor>>& grads,
    double decay, double scale, const std::optional<Tensor>& segments, const Tensor& group_sums,
    const Tensor& nonfinite);

}  // namespace fisheradaptune
