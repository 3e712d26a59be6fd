#include "common/validate.h"

#include <algorithm>
#include <array>
#include <utility>
#include <vector>

#include "sparse/sampled_grad.h"

namespace fisheradaptune {

namespace {

namespace sd = torch::stable::detail;

// Note [Checked indices]
// On CUDA the range of an index is read back to the host (a synchronisation), and the index of
// a SparseLinear is static: checking it at every backward would synchronise every training
// step. Which indices were already checked is remembered in Python, because the stable ABI has
// no version counter, inference flag or weak tensor reference: the op takes a trailing
// `index_checked` (default false) and skips the range check when it is true. The typed wrapper
// fisheradaptune.ops.sampled_grad records each index that passed the check: a weak reference to
// the tensor, its version counter (an in-place write to the index, or to any view sharing its
// counter, bumps it), its data pointer, shape and strides, and the `in` it was checked against;
// it passes true only while all of them still match and x has at least that many columns. So an
// in-place write, a freed index (a new tensor at the same address), a `.data` swap or a
// narrower x forces a new check. Inference tensors have no version counter and are never
// recorded (checked on every call), nor are tensor subclasses or tensors seen while
// torch.compile traces. A raw call checks unless its caller passes true.
// A stale flag (true for an index holding a value outside [0, in): a write that bypasses the
// counter, such as one through `.data`, or a caller's mistake) is memory-safe: both kernels
// guard every read of x, and each output element whose column is out of range is NaN, never an
// out-of-bounds read and never a plausible number. (With T == 0 nothing is read and the result
// is zeros, as for any index.)

// The smallest and largest value of a non-empty contiguous CUDA index: one read-back to the
// host (synchronises).
std::pair<int64_t, int64_t> device_range(const Tensor& flat) {
  // aten::aminmax(Tensor self, *, int? dim=None, bool keepdim=False) -> (Tensor min, Tensor max)
  std::array<StableIValue, 3> mm{sd::from(flat), sd::from(std::optional<int64_t>()),
                                 sd::from(false)};
  call_op("aten::aminmax", "", mm);
  const Tensor lo = sd::to<Tensor>(mm[0]);
  const Tensor hi = sd::to<Tensor>(mm[1]);
  // aten::stack(Tensor[] tensors, int dim=0) -> Tensor: both values in one copy.
  std::array<StableIValue, 2> s{sd::from(std::vector<Tensor>{lo, hi}), sd::from(int64_t(0))};
  call_op("aten::stack", "", s);
  const Tensor both = st::to(sd::to<Tensor>(s[0]), cpu_device());  // synchronises
  const int64_t* v = both.const_data_ptr<int64_t>();
  return {v[0], v[1]};
}

// The smallest and largest value of a non-empty contiguous index.
std::pair<int64_t, int64_t> index_range(const Tensor& flat) {
  if (!flat.is_cpu()) return device_range(flat);
  const int64_t* idx = flat.const_data_ptr<int64_t>();
  int64_t lo = idx[0], hi = idx[0];
  for (int64_t j = 1; j < flat.numel(); ++j) {
    lo = std::min(lo, idx[j]);
    hi = std::max(hi, idx[j]);
  }
  return {lo, hi};
}

bool sparse_dtype(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::BFloat16 || t == ScalarType::Half ||
         t == ScalarType::Double;
}

}  // namespace

SampledGradArgs validate_sampled_grad(const Tensor& grad_out, const Tensor& x, const Tensor& index,
                                      bool index_checked) {
  constexpr const char* op = "sampled_grad";
  FAT_CHECK_VALUE(grad_out.dim() == 2, op, "grad_out", "expected [T, out], got shape ",
                  grad_out.sizes());
  FAT_CHECK_VALUE(sparse_dtype(grad_out.scalar_type()), op, "grad_out",
                  "expected float32, bfloat16, float16 or float64, got ", grad_out.scalar_type());
  check_device(op, "x", x, grad_out.device());
  FAT_CHECK_VALUE(x.dim() == 2 && x.size(0) == grad_out.size(0), op, "x",
                  "expected [T, in] with T = ", grad_out.size(0), " (grad_out's rows), got shape ",
                  x.sizes());
  FAT_CHECK_VALUE(x.scalar_type() == grad_out.scalar_type(), op, "x",
                  "expected grad_out's dtype (", grad_out.scalar_type(), "), got ",
                  x.scalar_type());
  check_device(op, "index", index, grad_out.device());
  FAT_CHECK_VALUE(index.scalar_type() == ScalarType::Long, op, "index", "expected int64, got ",
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
  a.index = st::contiguous(index);
  if (a.rows * a.picks > 0) {
    // A shape, not data: checked whatever index_checked says.
    FAT_CHECK_VALUE(a.cols > 0, op, "index",
                    "expected no columns (C = 0) when x has no features (in = 0), got shape ",
                    index.sizes());
    // Index values in [0, in) (Note [Sampled gradient]): on every backend, also when T == 0,
    // unless the caller vouches for them (Note [Checked indices]).
    if (!index_checked) {
      const auto [lo, hi] = index_range(a.index);
      FAT_CHECK_VALUE(lo >= 0 && hi < a.cols, op, "index",
                      "expected values in [0, in) = [0, ", a.cols, "), got values in [", lo,
                      ", ", hi, "]");
    }
  }
  a.out_dtype = grad_out.scalar_type() == ScalarType::Double ? ScalarType::Double
                                                             : ScalarType::Float;
  return a;
}

}  // namespace fisheradaptune
