// The LibTorch stable ABI, as the extension uses it. Every ported translation unit includes this
// header first (directly or through common/validate.h).
//
// Note [Stable ABI]
// The library is compiled against the stable C shim of libtorch (torch/csrc/stable,
// torch/headeronly) only, never against ATen/c10 C++ headers, so one binary loads into every
// torch from the target version on (TORCH_TARGET_VERSION below) without a rebuild. The compiler
// enforces it: with TORCH_TARGET_VERSION defined, every unstable header stops the build with an
// #error, and an API newer than the target is compiled out.
// What the stable API cannot do, and where it is done instead:
//   - a C++ exception becomes a Python exception by its std type: std::invalid_argument is
//     ValueError (message unchanged), std::runtime_error RuntimeError. There is no TypeError, so
//     every argument error of an op, a dtype included, is a ValueError (FAT_CHECK_VALUE).
//   - exceptions thrown inside st::parallel_for or a dispatcher call lose their type: validate
//     before any parallel region.
#pragma once

// torch 2.11: the bytes [MAJ][MIN][PATCH][ABI tag x5]. setup.py passes the same value with -D.
#ifndef TORCH_TARGET_VERSION
#define TORCH_TARGET_VERSION (((0ULL + 2) << 56) | ((0ULL + 11) << 48))
#endif

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/Dispatch.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <array>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace fisheradaptune {

namespace st = torch::stable;
namespace tho = torch::headeronly;
using Tensor = torch::stable::Tensor;
using Device = torch::stable::Device;
using ScalarType = torch::headeronly::ScalarType;
using DeviceType = torch::headeronly::DeviceType;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

// ---- messages -----------------------------------------------------------------------------
// Written as c10's TORCH_CHECK writes its arguments, so the texts did not change with the port:
// devices as "cpu", "cuda:0", "meta"; sizes as "[2, 3]"; dtypes as "Float", "Long".
namespace detail {

inline const char* device_type_name(DeviceType t) {
  switch (t) {
    case DeviceType::CPU: return "cpu";
    case DeviceType::CUDA: return "cuda";
    case DeviceType::Meta: return "meta";
    case DeviceType::MPS: return "mps";
    case DeviceType::XPU: return "xpu";
    case DeviceType::HIP: return "hip";
    case DeviceType::XLA: return "xla";
    case DeviceType::Lazy: return "lazy";
    case DeviceType::PrivateUse1: return "privateuseone";
    default: return "device";
  }
}

template <typename T>
inline void put(std::ostream& os, const T& v) {
  os << v;
}
inline void put(std::ostream& os, const Device& d) {
  os << device_type_name(d.type());
  if (d.has_index()) os << ':' << static_cast<int>(d.index());
}
inline void put(std::ostream& os, ScalarType s) { os << tho::toString(s); }
inline void put(std::ostream& os, tho::IntHeaderOnlyArrayRef sizes) {
  os << '[';
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << ']';
}
inline void put(std::ostream& os, const std::vector<int64_t>& sizes) {
  put(os, tho::IntHeaderOnlyArrayRef(sizes));
}

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (put(os, args), ...);
  return os.str();
}

}  // namespace detail

// An argument error of op `op` (a const char*), naming the argument `where` ("grads[3]"):
//   fisheradaptune.fisher_accumulate_: argument 'grads[3]': expected shape [4, 8], got [8, 4]
// Raised as ValueError (Note [Stable ABI]).
#define FAT_CHECK_VALUE(cond, op, where, ...)                                             \
  do {                                                                                    \
    if (__builtin_expect(!(cond), 0)) {                                                   \
      throw std::invalid_argument(::fisheradaptune::detail::cat(                          \
          "fisheradaptune.", op, ": argument '", where, "': ", __VA_ARGS__));             \
    }                                                                                     \
  } while (0)

// A failure that is not a bad argument (e.g. a call under CUDA-graph capture): RuntimeError,
// the message as given.
#define FAT_CHECK_RUNTIME(cond, ...)                                                      \
  do {                                                                                    \
    if (__builtin_expect(!(cond), 0)) {                                                   \
      throw std::runtime_error(::fisheradaptune::detail::cat(__VA_ARGS__));               \
    }                                                                                     \
  } while (0)

// An internal invariant (a bug in the extension, never the caller's input): RuntimeError with
// the file and line.
#define FAT_INTERNAL_ASSERT(cond, ...) STD_TORCH_CHECK(cond, "fisheradaptune internal error: " __VA_ARGS__)

// ---- dtype dispatch -----------------------------------------------------------------------
// FAT_DISPATCH_FLOATING(TYPE, NAME, lambda): float64 and float32 (scalar_t in the lambda).
// FAT_DISPATCH_FLOATING_AND_HALF(TYPE, NAME, lambda): also bfloat16 and float16.
// (THO_DISPATCH_V2 is not used: its argument list breaks on commas inside the lambda.)
#define FAT_DISPATCH_FLOATING(TYPE, NAME, ...)                          \
  THO_DISPATCH_SWITCH(TYPE, NAME,                                       \
                      THO_DISPATCH_CASE(::torch::headeronly::ScalarType::Double, __VA_ARGS__) \
                      THO_DISPATCH_CASE(::torch::headeronly::ScalarType::Float, __VA_ARGS__))
#define FAT_DISPATCH_FLOATING_AND_HALF(TYPE, NAME, ...)                                      \
  THO_DISPATCH_SWITCH(TYPE, NAME,                                                            \
                      THO_DISPATCH_CASE(::torch::headeronly::ScalarType::Double, __VA_ARGS__)   \
                      THO_DISPATCH_CASE(::torch::headeronly::ScalarType::Float, __VA_ARGS__)    \
                      THO_DISPATCH_CASE(::torch::headeronly::ScalarType::BFloat16, __VA_ARGS__) \
                      THO_DISPATCH_CASE(::torch::headeronly::ScalarType::Half, __VA_ARGS__))

// The accumulation type of a storage type (at::opmath_type): float for the 16-bit floats,
// the type itself otherwise.
template <typename T>
struct OpMath {
  using type = T;
};
template <>
struct OpMath<Half> {
  using type = float;
};
template <>
struct OpMath<BFloat16> {
  using type = float;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

// ---- allocation and ATen calls ------------------------------------------------------------
inline Tensor empty(const std::vector<int64_t>& sizes, ScalarType dtype, const Device& device) {
  return st::empty(sizes, dtype, std::nullopt, device);
}
inline Tensor zeros(const std::vector<int64_t>& sizes, ScalarType dtype, const Device& device) {
  Tensor t = empty(sizes, dtype, device);
  st::zero_(t);
  return t;
}
inline Device cpu_device() { return Device(DeviceType::CPU); }
// The tensor itself when it is contiguous, else a contiguous copy: st::contiguous always goes
// through the dispatcher (a fraction of a microsecond per tensor, per call), at::contiguous did
// not.
inline Tensor as_contiguous(const Tensor& t) {
  return t.is_contiguous() ? t : st::contiguous(t);
}
inline bool is_meta(const Tensor& t) { return t.device().type() == DeviceType::Meta; }

// Calls an ATen operator through the stable dispatcher. `stack` holds every argument of the
// schema in order, defaulted ones included, and at least as many slots as the op returns;
// returns are left in stack[0..] (read them with st::detail::to<T>, which also releases them).
template <size_t N>
void call_op(const char* name, const char* overload, std::array<StableIValue, N>& stack) {
  STABLE_TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
}

}  // namespace fisheradaptune
