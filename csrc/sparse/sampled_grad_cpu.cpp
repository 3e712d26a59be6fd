// CPU kernel of sampled_grad (Note [Sampled gradient], csrc/sparse/sampled_grad.h). grad_out and x
// are transposed once to [out, T] and [in, T] in the accumulation type, so every output element is
// one contiguous dot product over T (an omp-simd reduction flushed into a double every block,
// Note [CPU vectorisation]); rows run in parallel, each element computed by one thread in a
// fixed order: bitwise deterministic for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "common/simd.h"
#include "sparse/sampled_grad.h"
#include "validate.h"

namespace fisheradaptune {
namespace {


at::Tensor sampled_grad_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                            const at::Tensor& index) {
  const SampledGradArgs a = validate_sampled_grad(grad_out, x, index);
  const int64_t T = a.tokens, R = a.rows, C = a.picks;
  // validate_sampled_grad checked every index value against [0, in).
  const int64_t* idx = a.index.data_ptr<int64_t>();
  if (T == 0 || R * C == 0) {
    return at::zeros({R, C}, a.grad_out.options().dtype(a.out_dtype));
  }
  at::Tensor out = at::empty({R, C}, a.grad_out.options().dtype(a.out_dtype));
  // [out, T] and [in, T] in the accumulation type: each dot below reads two contiguous rows.
  const at::Tensor gt = a.grad_out.t().to(a.out_dtype).contiguous();
  const at::Tensor xt = a.x.t().to(a.out_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES(a.out_dtype == at::kDouble ? at::kDouble : at::kFloat,
                             "sampled_grad_cpu", [&] {
    using A = scalar_t;
    const A* g = gt.data_ptr<A>();
    const A* xs = xt.data_ptr<A>();
    A* o = out.data_ptr<A>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C * T));
    at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const A* gi = g + i * T;
        for (int64_t c = 0; c < C; ++c) {
          o[i * C + c] = blocked_dot<A, A>(gi, xs + idx[i * C + c] * T, T);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fisheradaptune, CPU, m) {
  m.impl("sampled_grad", &sampled_grad_cpu);
}

}  // namespace fisheradaptune
