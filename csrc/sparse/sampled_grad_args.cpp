#include "sparse/sampled_grad.h"

#include <ATen/ops/aminmax.h>
#include <ATen/ops/stack.h>

#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <array>
#include <mutex>
#include <optional>
#include <utility>

#include "validate.h"

namespace fisheradaptune {

namespace {

// Note [Checked indices]
// On CUDA the range of an index is read back to the host (a synchronisation). The index of a
// SparseLinear is static, so the ranges of recently checked device indices are remembered,
// keyed by the tensor itself and its version counter: an in-place write to the index (or to any
// view sharing its counter) bumps the version and forces a new check; a freed index expires its
// weak reference, so a new tensor at the same address is never mistaken for it. Inference
// tensors have no version counter and are checked on every call. A write that bypasses the
// counter (through `.data`) is not seen; the kernel still guards every read, so such an index
// yields NaN for the affected elements, never an out-of-bounds access.
struct CheckedIndex {
  std::optional<c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>> impl;
  int64_t version = -1;
  int64_t lo = 0, hi = 0;
};

constexpr size_t kCheckedIndices = 64;

std::pair<int64_t, int64_t> device_range(const at::Tensor& index) {
  const auto [mn, mx] = at::aminmax(index);
  const at::Tensor both = at::stack({mn, mx}).cpu();  // synchronises
  return {both.const_data_ptr<int64_t>()[0], both.const_data_ptr<int64_t>()[1]};
}

// The smallest and largest value of `index` (non-empty); `flat` is its contiguous copy.
std::pair<int64_t, int64_t> index_range(const at::Tensor& index, const at::Tensor& flat) {
  if (flat.device().is_cpu()) {
    const int64_t* idx = flat.const_data_ptr<int64_t>();
    int64_t lo = idx[0], hi = idx[0];
    for (int64_t j = 1; j < flat.numel(); ++j) {
      lo = std::min(lo, idx[j]);
      hi = std::max(hi, idx[j]);
    }
    return {lo, hi};
  }
  if (index.is_inference()) return device_range(flat);
  static std::mutex mu;
  static std::array<CheckedIndex, kCheckedIndices> cache;
  static size_t next = 0;
  const int64_t version = static_cast<int64_t>(index._version());
  {
    const std::lock_guard<std::mutex> lock(mu);
    for (const CheckedIndex& e : cache) {
      if (e.impl && e.version == version && e.impl->lock().get() == index.unsafeGetTensorImpl()) {
        return {e.lo, e.hi};
      }
    }
  }
  const auto range = device_range(flat);
  const std::lock_guard<std::mutex> lock(mu);
  CheckedIndex& slot = cache[next++ % kCheckedIndices];
  slot.impl.emplace(index.getIntrusivePtr());
  slot.version = version;
  slot.lo = range.first;
  slot.hi = range.second;
  return range;
}

bool sparse_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

}  // namespace

SampledGradArgs validate_sampled_grad(const at::Tensor& grad_out, const at::Tensor& x,
                                      const at::Tensor& index) {
  constexpr const char* op = "sampled_grad";
  FAT_CHECK_VALUE(grad_out.dim() == 2, op, "grad_out", "expected [T, out], got shape ",
                  grad_out.sizes());
  FAT_CHECK_TYPE(sparse_dtype(grad_out.scalar_type()), op, "grad_out",
                 "expected float32, bfloat16, float16 or float64, got ", grad_out.scalar_type());
  check_device(op, "x", x, grad_out.device());
  FAT_CHECK_VALUE(x.dim() == 2 && x.size(0) == grad_out.size(0), op, "x",
                  "expected [T, in] with T = ", grad_out.size(0), " (grad_out's rows), got shape ",
                  x.sizes());
  FAT_CHECK_TYPE(x.scalar_type() == grad_out.scalar_type(), op, "x", "expected grad_out's dtype (",
                 grad_out.scalar_type(), "), got ", x.scalar_type());
  check_device(op, "index", index, grad_out.device());
  FAT_CHECK_TYPE(index.scalar_type() == at::kLong, op, "index", "expected int64, got ",
                 index.scalar_type());
  FAT_CHECK_VALUE(index.dim() == 2 && index.size(0) == grad_out.size(1), op, "index",
                  "expected [out, C] with out = ", grad_out.size(1),
                  " (grad_out's columns), got shape ", index.sizes());
  SampledGradArgs a;
  a.tokens = grad_out.size(0);
  a.rows = grad_out.size(1);
  a.cols = x.size(1);
  a.picks = index.size(1);
  a.grad_out = grad_out;
  a.x = x;
  a.index = index.contiguous();
  // Index values in [0, in) (Note [Sampled gradient]): on every backend, also when T == 0.
  if (a.rows * a.picks > 0) {
    FAT_CHECK_VALUE(a.cols > 0, op, "index",
                    "expected no columns (C = 0) when x has no features (in = 0), got shape ",
                    index.sizes());
    const auto [lo, hi] = index_range(index, a.index);
    FAT_CHECK_VALUE(lo >= 0 && hi < a.cols, op, "index",
                    "expected values in [0, in) = [0, ", a.cols, "), got values in [", lo, ", ",
                    hi, "]");
  }
  a.out_dtype = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return a;
}

}  // namespace fisheradaptune
