// fisher_accumulate_: argument validation shared by the CPU and CUDA kernels
// (fisher_accumulate_args.cpp). The update and Note [Skipping]: fisher_accumulate_cpu.cpp.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>
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

}  // namespace fisheradaptune
