// Shared argument validation for every fisheradaptune op.
//
// Every op validates all of its arguments before it touches memory, so a bad call leaves its
// inputs exactly as they were. Messages name the op and the argument:
//   fisheradaptune.fisher_accumulate_: argument 'grads[3]': expected shape [4, 8], got [8, 4]
// ValueError is raised for bad shapes, lengths and values; TypeError for bad dtypes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <vector>

namespace fisheradaptune {

// `where` names the argument, e.g. "grads[3]".
#define FAT_CHECK_VALUE(cond, op, where, ...) \
  TORCH_CHECK_VALUE((cond), "fisheradaptune.", op, ": argument '", where, "': ", __VA_ARGS__)
#define FAT_CHECK_TYPE(cond, op, where, ...) \
  TORCH_CHECK_TYPE((cond), "fisheradaptune.", op, ": argument '", where, "': ", __VA_ARGS__)

inline std::string item_name(const char* arg, size_t i) {
  return std::string(arg) + "[" + std::to_string(i) + "]";
}

inline void check_same_length(const char* op, const char* a, size_t na, const char* b, size_t nb) {
  FAT_CHECK_VALUE(na == nb, op, b, "expected a list of the same length as '", a, "' (", na,
                  "), got ", nb);
}

inline void check_device(const char* op, const std::string& where, const at::Tensor& t,
                         const c10::Device& device) {
  FAT_CHECK_VALUE(t.device() == device, op, where, "expected a tensor on ", device, ", got ",
                  t.device());
}

inline void check_same_shape(const char* op, const std::string& where, const at::Tensor& t,
                             const at::Tensor& like) {
  FAT_CHECK_VALUE(t.sizes() == like.sizes(), op, where, "expected shape ", like.sizes(),
                  ", got ", t.sizes());
}

// Fisher-like state: float32 everywhere, float64 on CPU; contiguous because kernels write it.
inline void check_state(const char* op, const std::string& where, const at::Tensor& t) {
  const bool ok_dtype = t.scalar_type() == at::kFloat ||
                        (t.scalar_type() == at::kDouble && t.device().is_cpu());
  FAT_CHECK_TYPE(ok_dtype, op, where, "expected float32 (or float64 on CPU), got ",
                 t.scalar_type(), " on ", t.device());
  FAT_CHECK_VALUE(t.is_contiguous(), op, where, "expected a contiguous tensor");
}

// Gradient-like input: float32, bfloat16 or float16 (float64 too when the state is float64).
inline void check_grad_dtype(const char* op, const std::string& where, const at::Tensor& g,
                             const at::Tensor& state) {
  const auto t = g.scalar_type();
  const bool ok = t == at::kFloat || t == at::kBFloat16 || t == at::kHalf ||
                  (t == at::kDouble && state.scalar_type() == at::kDouble);
  FAT_CHECK_TYPE(ok, op, where, "expected float32, bfloat16 or float16 (float64 with float64 ",
                 "state), got ", t);
}

inline void check_finite_scalar(const char* op, const char* where, double v) {
  FAT_CHECK_VALUE(std::isfinite(v), op, where, "expected a finite number, got ", v);
}

}  // namespace fisheradaptune
