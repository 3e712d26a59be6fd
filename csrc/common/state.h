// The dtypes of Fisher-like state written by the Fisher and drift kernels (fisher_accumulate_'s
// fisher, js_drift's reference): float32 everywhere, bfloat16 everywhere (Note [bfloat16 state]),
// float64 on the CPU. Shared by the fisher and drift families; check_state / check_state_list
// (common/validate.h) stay float32/float64 for per_sample_grad_sq_.
#pragma once

#include "common/stable.h"

#include <bit>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "common/validate.h"

namespace fisheradaptune {

// Note [bfloat16 state]
// FisherAdapTune's fisher_dtype=torch.bfloat16 keeps the Fisher and the drift reference in
// bfloat16 (half the memory). A kernel reads each element widened to float32 (exact), computes
// exactly as for float32 state (the same float32 operations, rounded separately), and rounds the
// stored result once to bfloat16 (round to nearest even). Skip rule (Note [Skipping],
// fisher/fisher_accumulate_cpu.cpp): the test |x| <= max is applied to the value that would be
// stored, so an update that is finite in float32 but rounds to Inf in bfloat16 (above bfloat16's
// largest finite value, 3.3895e38, by half an ulp or more) is skipped and counted like a NaN.
// Sums over the state (group_sums, drift totals) add the stored bfloat16 values in float32 or
// float64, as the kernels do for float32 state.
inline void check_fisher_state(const char* op, const std::string& where, const Tensor& t) {
  const ScalarType s = t.scalar_type();
  const bool ok_dtype = s == ScalarType::Float || s == ScalarType::BFloat16 ||
                        (s == ScalarType::Double && t.is_cpu());
  FAT_CHECK_VALUE(ok_dtype, op, where, "expected float32 or bfloat16 (or float64 on CPU), got ",
                  s, " on ", t.device());
  FAT_CHECK_VALUE(t.is_contiguous(), op, where, "expected a contiguous tensor");
}

inline std::vector<int64_t> check_fisher_state_list(const char* op, const char* arg,
                                                    const std::vector<Tensor>& list,
                                                    const Device& device) {
  std::vector<int64_t> numels;
  numels.reserve(list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const std::string where = item_name(arg, i);
    check_device(op, where, list[i], device);
    check_fisher_state(op, where, list[i]);
    numels.push_back(list[i].numel());
  }
  return numels;
}

// bfloat16's largest finite value (bits 0x7f7f), exactly representable in float.
constexpr float kBFloat16Max = 3.38953138925153547590470800371487866880e+38f;

// The largest finite value of a state dtype, in its compute type (opmath_t).
template <typename S>
constexpr opmath_t<S> state_max() {
  return std::numeric_limits<S>::max();
}
template <>
constexpr float state_max<BFloat16>() {
  return kBFloat16Max;
}

// How the CPU kernels read and write state of dtype S: `storage` is what the loops index (the
// bits, uint16_t, for bfloat16), load widens a stored value to T = opmath_t<S> and store rounds
// a T to S, and select(ok, a, b) is ok ? a : b. For bfloat16 all three are written on the bits
// with masks, no branch or select on 16-bit values, so that the FAT_SIMD loops vectorise (c10's
// conversion branches on isnan, and GCC reports "control flow in loop" for a 16-bit ?:; either
// kept the loops scalar, 7x slower than float's). They are bitwise c10's conversions: widening
// is exact, narrowing rounds to nearest even (a value at or past max + ulp/2 becomes Inf) and
// any NaN becomes 0x7fc0. Host only (CUDA has its own intrinsics).
template <typename S>
struct StateIO {
  using storage = S;
  __attribute__((always_inline)) static opmath_t<S> load(storage v) { return v; }
  __attribute__((always_inline)) static storage store(opmath_t<S> v) { return v; }
  __attribute__((always_inline)) static storage select(bool ok, storage a, storage b) {
    return ok ? a : b;
  }
};
template <>
struct StateIO<BFloat16> {
  using storage = uint16_t;
  __attribute__((always_inline)) static float load(uint16_t v) {
    return std::bit_cast<float>(static_cast<uint32_t>(v) << 16);
  }
  __attribute__((always_inline)) static uint16_t store(float f) {
    const uint32_t u = std::bit_cast<uint32_t>(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t nan = 0u - static_cast<uint32_t>((u & 0x7fffffffu) > 0x7f800000u);
    return static_cast<uint16_t>((rounded & ~nan) | (0x7fc0u & nan));
  }
  __attribute__((always_inline)) static uint16_t select(bool ok, uint16_t a, uint16_t b) {
    const uint32_t m = 0u - static_cast<uint32_t>(ok);
    return static_cast<uint16_t>((a & m) | (b & ~m));
  }
};

// Dispatch over the state dtypes: float64, float32, bfloat16 (scalar_t in the lambda).
#define FAT_DISPATCH_STATE_TYPES(TYPE, NAME, ...)                                               \
  THO_DISPATCH_SWITCH(TYPE, NAME,                                                              \
                      THO_DISPATCH_CASE(::torch::headeronly::ScalarType::Double, __VA_ARGS__)   \
                      THO_DISPATCH_CASE(::torch::headeronly::ScalarType::Float, __VA_ARGS__)    \
                      THO_DISPATCH_CASE(::torch::headeronly::ScalarType::BFloat16, __VA_ARGS__))

}  // namespace fisheradaptune
