#include "sparse.h"

#include "validate.h"

namespace fisheradaptune {

namespace {

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
  a.out_dtype = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return a;
}

}  // namespace fisheradaptune
