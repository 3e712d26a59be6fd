#include "common/validate.h"

#include "fisher/per_sample_grad_sq.h"

namespace fisheradaptune {

void validate_per_sample_grad_sq(const Tensor& fisher, const Tensor& x, const Tensor& grad_out,
                                 double scale, const Tensor& nonfinite) {
  constexpr const char* op = "per_sample_grad_sq_";
  check_coefficient(op, "scale", scale);  // Note [Coefficients]
  check_state(op, "fisher", fisher);
  check_device(op, "nonfinite", nonfinite, fisher.device());
  FAT_CHECK_VALUE(nonfinite.scalar_type() == ScalarType::Long, op, "nonfinite",
                  "expected int64, got ", nonfinite.scalar_type());
  FAT_CHECK_VALUE(nonfinite.numel() == 1, op, "nonfinite", "expected one element, got ",
                  nonfinite.numel());
  check_device(op, "x", x, fisher.device());
  check_device(op, "grad_out", grad_out, fisher.device());
  FAT_CHECK_VALUE(x.dim() == 3, op, "x", "expected [N, T, in_features], got shape ", x.sizes());
  FAT_CHECK_VALUE(grad_out.dim() == 3, op, "grad_out",
                  "expected [N, T, out_features], got shape ", grad_out.sizes());
  FAT_CHECK_VALUE(grad_out.size(0) == x.size(0) && grad_out.size(1) == x.size(1), op,
                  "grad_out", "expected the same N and T as x ", x.sizes(), ", got ",
                  grad_out.sizes());
  FAT_CHECK_VALUE(fisher.dim() == 2 && fisher.size(0) == grad_out.size(2) &&
                      fisher.size(1) == x.size(2),
                  op, "fisher", "expected shape [", grad_out.size(2), ", ", x.size(2),
                  "] (out_features, in_features), got ", fisher.sizes());
  check_grad_dtype(op, "x", x, fisher);
  FAT_CHECK_VALUE(grad_out.scalar_type() == x.scalar_type(), op, "grad_out",
                  "expected the dtype of x (", x.scalar_type(), "), got ",
                  grad_out.scalar_type());
  // Note [Aliasing]: the GEMMs read x and grad_out in place (strided), fisher and the count
  // are written.
  check_no_aliasing(op, {{&fisher, "fisher", true},
                         {&x, "x", false},
                         {&grad_out, "grad_out", false},
                         {&nonfinite, "nonfinite", true}});
}

}  // namespace fisheradaptune
