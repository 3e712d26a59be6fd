// Shared argument validation for every fisheradaptune op.
//
// Every op validates all of its arguments before it touches memory, so a bad call leaves its
// inputs exactly as they were. Messages name the op and the argument:
//   fisheradaptune.fisher_accumulate_: argument 'grads[3]': expected shape [4, 8], got [8, 4]
// Every argument error is a ValueError, a bad dtype included (Note [Stable ABI],
// common/stable.h).
#pragma once

#include "common/stable.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "common/plan.h"

namespace fisheradaptune {

inline std::string item_name(const char* arg, size_t i) {
  return std::string(arg) + "[" + std::to_string(i) + "]";
}

inline void check_same_length(const char* op, const char* a, size_t na, const char* b, size_t nb) {
  FAT_CHECK_VALUE(na == nb, op, b, "expected a list of the same length as '", a, "' (", na,
                  "), got ", nb);
}

inline void check_device(const char* op, const std::string& where, const Tensor& t,
                         const Device& device) {
  FAT_CHECK_VALUE(t.device() == device, op, where, "expected a tensor on ", device, ", got ",
                  t.device());
}

inline void check_same_shape(const char* op, const std::string& where, const Tensor& t,
                             const Tensor& like) {
  FAT_CHECK_VALUE(t.sizes() == like.sizes(), op, where, "expected shape ", like.sizes(),
                  ", got ", t.sizes());
}

// Fisher-like state: float32 everywhere, float64 on CPU; contiguous because kernels write it.
inline void check_state(const char* op, const std::string& where, const Tensor& t) {
  const bool ok_dtype = t.scalar_type() == ScalarType::Float ||
                        (t.scalar_type() == ScalarType::Double && t.is_cpu());
  FAT_CHECK_VALUE(ok_dtype, op, where, "expected float32 (or float64 on CPU), got ",
                 t.scalar_type(), " on ", t.device());
  FAT_CHECK_VALUE(t.is_contiguous(), op, where, "expected a contiguous tensor");
}

// A list of state tensors (fisher_accumulate_'s fisher, js_drift's reference): each on `device`,
// a state dtype, contiguous. Returns their numels.
inline std::vector<int64_t> check_state_list(const char* op, const char* arg,
                                             const std::vector<Tensor>& list, const Device& device) {
  std::vector<int64_t> numels;
  numels.reserve(list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const std::string where = item_name(arg, i);
    check_device(op, where, list[i], device);
    check_state(op, where, list[i]);
    numels.push_back(list[i].numel());
  }
  return numels;
}

// Gradient-like input: float32, bfloat16 or float16 (float64 too when the state is float64).
inline void check_grad_dtype(const char* op, const std::string& where, const Tensor& g,
                             const Tensor& state) {
  const auto t = g.scalar_type();
  const bool ok = t == ScalarType::Float || t == ScalarType::BFloat16 || t == ScalarType::Half ||
                  (t == ScalarType::Double && state.scalar_type() == ScalarType::Double);
  FAT_CHECK_VALUE(ok, op, where, "expected float32, bfloat16 or float16 (float64 with float64 ",
                 "state), got ", t);
}

// Token ops (token_prune_merge, bipartite_merge): the dtypes of tokens and their metrics, and
// the dispatch over exactly those.
#define FAT_DISPATCH_TOKEN_TYPES(TYPE, NAME, ...) \
  FAT_DISPATCH_FLOATING_AND_HALF(TYPE, NAME, __VA_ARGS__)

inline void check_token_dtype(const char* op, const char* where, const Tensor& t) {
  const auto s = t.scalar_type();
  FAT_CHECK_VALUE(s == ScalarType::Float || s == ScalarType::BFloat16 || s == ScalarType::Half || s == ScalarType::Double, op,
                 where, "expected float32, bfloat16, float16 or float64, got ", s);
}

// Both backends' token kernels hold token and out-row indices as int32 (half the memory and
// registers of int64 in the selections, O(N) per row on CPU and O(N^2 / threads) on CUDA);
// checked before anything is allocated, so that the limit is the same on both backends and
// whatever B and C (also for an empty batch).
inline void check_token_count(const char* op, const char* where, int64_t n) {
  FAT_CHECK_VALUE(n <= std::numeric_limits<int32_t>::max(), op, where,
                  "expected at most 2^31 - 1 tokens (N; the kernels index tokens in int32), "
                  "got N = ", n);
}

// The token tensor of a token op: x [B, N, C] of a token dtype, N within the int32 index range.
// Fills args.batch, args.tokens and args.channels.
template <typename Args>
void read_token_input(const char* op, const Tensor& x, Args& args) {
  FAT_CHECK_VALUE(x.dim() == 3, op, "x", "expected [B, N, C], got shape ", x.sizes());
  check_token_dtype(op, "x", x);
  args.batch = x.size(0);
  args.tokens = x.size(1);
  args.channels = x.size(2);
  check_token_count(op, "x", args.tokens);
}

// Token sizes: float32 [B, N] on x's device, or absent (all ones). Returns them contiguous.
inline Tensor check_token_sizes(const char* op, const std::optional<Tensor>& sizes,
                                    int64_t batch, int64_t tokens, const Device& device) {
  if (!sizes.has_value() || !sizes->defined()) return Tensor();
  check_device(op, "sizes", *sizes, device);
  FAT_CHECK_VALUE(sizes->dim() == 2 && sizes->size(0) == batch && sizes->size(1) == tokens, op,
                  "sizes", "expected shape [B, N] = [", batch, ", ", tokens, "], got ",
                  sizes->sizes());
  FAT_CHECK_VALUE(sizes->scalar_type() == ScalarType::Float, op, "sizes", "expected float32, got ",
                 sizes->scalar_type());
  return as_contiguous(*sizes);
}

// Note [Coefficients]
// decay, scale and update_reference's rho arrive as doubles but every kernel multiplies in the
// state's precision, float32 on CUDA and for float32 state on CPU: a finite double beyond
// float32's range (1e308) would become inf there and turn every element it touches into inf or
// NaN (0 * inf), which the skip rule (Note [Skipping]) would then silently drop as
// "non-finite". A negative coefficient would make the Fisher negative (decay, scale) or the
// reference EMA extrapolate (rho). So a coefficient must be a finite number in [0, hi], with hi
// at most float32's largest value; the same range for float64 state, so that whether a call is
// accepted never depends on the state's dtype or device. NaN fails every comparison.
inline void check_coefficient(const char* op, const char* where, double v,
                              const char* what = "a finite number",
                              double hi = static_cast<double>(std::numeric_limits<float>::max())) {
  FAT_CHECK_VALUE(v >= 0.0 && v <= hi, op, where, "expected ", what, " in [0, ", hi, "]",
                  hi == static_cast<double>(std::numeric_limits<float>::max())
                      ? " (float32's range: the kernels multiply in float32)"
                      : "",
                  ", got ", v);
}

// Note [Aliasing]
// An op writes its in-place targets (fisher[i], reference[j] under update_reference, the count
// and sums outputs) from chunks that run concurrently (threads on CPU, blocks on CUDA), while
// other chunks read the op's inputs. Two targets sharing memory (the same tensor passed twice
// included), or a target sharing memory with an input read in place, makes the result depend on
// scheduling: a lost update, or a score read from a half-updated reference. Validation rejects
// any overlap that involves a written tensor, before anything runs; inputs may overlap each
// other (they are only read).
//   - Byte ranges, not storages, are compared: two tensors of one storage that do not overlap
//     (the parameters of a flat buffer) are fine, and memory shared outside torch's storage
//     bookkeeping (from_blob) is still seen.
//   - A dense tensor is its exact range; a tensor with gaps (a strided view) is taken by its whole
//     span, which may reject interleaved views that do not actually collide (conservative).
//   - Inputs are checked as the kernel reads them: an op that copies a non-contiguous input to a
//     contiguous one before running reads the copy, which aliases nothing.
//   - Empty tensors own no memory and never overlap.
// The fake kernels (fisheradaptune/ops/_checks.py, _check_no_aliasing) make the same checks while
// tracing, comparing byte ranges within each storage, so torch.compile refuses what eager does.
// C10_HIDDEN: it holds a pointer to a stable Tensor, whose class has hidden visibility.
struct C10_HIDDEN MemoryArg {
  const Tensor* tensor;  // may be undefined
  std::string name;          // e.g. "fisher[3]"
  bool written;
};

inline void check_no_aliasing(const char* op, const std::vector<MemoryArg>& args) {
  struct Range {
    uintptr_t begin, end;
    size_t arg;  // index into args: argument order, used to name the later argument
  };
  std::vector<Range> ranges;
  ranges.reserve(args.size());
  bool any_written = false;
  for (size_t k = 0; k < args.size(); ++k) {
    const Tensor* t = args[k].tensor;
    if (t == nullptr || !t->defined() || t->numel() == 0 ||
        t->layout() != tho::Layout::Strided || is_meta(*t)) continue;
    const void* p = t->const_data_ptr();
    if (p == nullptr) continue;
    // Strides are never negative in torch, so the span starts at the data pointer.
    int64_t last = 0;
    for (int64_t d = 0; d < t->dim(); ++d) last += (t->size(d) - 1) * t->stride(d);
    const auto begin = reinterpret_cast<uintptr_t>(p);
    ranges.push_back({begin, begin + static_cast<uintptr_t>((last + 1) * t->element_size()), k});
    any_written = any_written || args[k].written;
  }
  if (!any_written || ranges.size() < 2) return;
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.arg < b.arg;
  });
  // Sweep in address order: a range overlaps an earlier one iff that one ends after it begins,
  // so keeping the furthest end seen so far (over all ranges, and over written ones) finds any
  // overlapping pair that involves a written tensor.
  const Range* far_any = nullptr;
  const Range* far_written = nullptr;
  for (const Range& r : ranges) {
    const Range* hit = args[r.arg].written ? far_any : far_written;
    if (hit != nullptr && hit->end > r.begin) {
      const size_t first = std::min(hit->arg, r.arg), second = std::max(hit->arg, r.arg);
      FAT_CHECK_VALUE(false, op, args[second].name, "shares memory with '", args[first].name,
                      "', and ", args[first].written && args[second].written ? "both are"
                                                                               : "one is",
                      " written in place: the kernels' parallel chunks would race. Pass tensors "
                      "that do not overlap (e.g. clone one of them)");
    }
    if (far_any == nullptr || r.end > far_any->end) far_any = &r;
    if (args[r.arg].written && (far_written == nullptr || r.end > far_written->end)) {
      far_written = &r;
    }
  }
}

// Validates `segments` (int64 [S, 4]) against the tensor sizes and the number of groups:
// indices in range, 0 <= begin <= end <= numel, no two segments overlapping. Empty segments are
// dropped. Raises ValueError naming `arg`.
//
// Note [Segments on the host]
// Kernels plan their work on the host, so the segments are read there. A CPU tensor (what the
// Python wrappers pass: GroupLayout.segments) is read in place and the op stays asynchronous
// on CUDA. A CUDA tensor is accepted but copied to the host first, which SYNCHRONISES with the
// device (and is refused under CUDA-graph capture, see mt::check_not_capturing); any other
// device (meta, ...) is refused with a ValueError naming `arg`.
std::vector<Segment> read_segments(const char* op, const char* arg, const Tensor& segments,
                                   const std::vector<int64_t>& numels, int64_t num_groups);

}  // namespace fisheradaptune
