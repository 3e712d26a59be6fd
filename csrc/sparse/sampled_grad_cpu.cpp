// CPU kernel of sampled_grad (Note [Sampled gradient], csrc/sparse/sampled_grad.h). grad_out and x
// are transposed once to [out, T] and [in, T] in the accumulation type, so every output element is
// one contiguous dot product over T (an omp-simd reduction flushed into a double every block,
// Note [CPU vectorisation]); rows run in parallel, each element computed by one thread in a
// fixed order: bitwise deterministic for any thread count.
#include "common/validate.h"

#include <algorithm>
#include <limits>

#include "common/simd.h"
#include "sparse/sampled_grad.h"

namespace fisheradaptune {
namespace {

Tensor sampled_grad_cpu(Tensor grad_out, Tensor x, Tensor index, bool index_checked) {
  const SampledGradArgs a = validate_sampled_grad(grad_out, x, index, index_checked);
  const int64_t T = a.tokens, R = a.rows, K = a.cols, C = a.picks;
  if (T == 0 || R * C == 0) return zeros({R, C}, a.out_dtype, a.grad_out.device());
  const int64_t* idx = a.index.const_data_ptr<int64_t>();
  Tensor out = empty({R, C}, a.out_dtype, a.grad_out.device());
  // [out, T] and [in, T] in the accumulation type: each dot below reads two contiguous rows.
  const Tensor gt = st::contiguous(st::to(st::transpose(a.grad_out, 0, 1), a.out_dtype));
  const Tensor xt = st::contiguous(st::to(st::transpose(a.x, 0, 1), a.out_dtype));
  FAT_DISPATCH_FLOATING(a.out_dtype, "sampled_grad_cpu", [&] {
    using A = scalar_t;
    const A* g = gt.const_data_ptr<A>();
    const A* xs = xt.const_data_ptr<A>();
    A* o = out.mutable_data_ptr<A>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C * T));
    st::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const A* gi = g + i * T;
        for (int64_t c = 0; c < C; ++c) {
          // In range unless the caller passed a stale index_checked: then NaN, never an
          // out-of-bounds read (Note [Checked indices], sparse/sampled_grad_args.cpp).
          const int64_t col = idx[i * C + c];
          o[i * C + c] = col >= 0 && col < K ? blocked_dot<A, A>(gi, xs + col * T, T)
                                             : std::numeric_limits<A>::quiet_NaN();
        }
      }
    });
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fisheradaptune, CPU, m) {
  m.impl("sampled_grad", TORCH_BOX(&sampled_grad_cpu));
}

}  // namespace fisheradaptune
