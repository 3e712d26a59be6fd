#include "per_sample.h"

#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "args.h"

namespace fisheradaptune {

void per_sample_grad_sq(const at::Tensor& fisher, const at::Tensor& x, const at::Tensor& grad_out,
                        double scale, int64_t tile_elems, SquareAccumulateFn square_accumulate) {
  validate_per_sample_grad_sq(fisher, x, grad_out, scale);
  const int64_t n = x.size(0), out = fisher.size(0), in = fisher.size(1);
  if (n == 0 || fisher.numel() == 0) return;
  // An empty token axis gives zero per-sample gradients: nothing to add.
  if (x.size(1) == 0) return;
  const int64_t per_sample = out * in;
  const int64_t step = std::clamp<int64_t>(tile_elems / per_sample, 1, n);
  const auto acc = fisher.scalar_type();
  at::Tensor tile = at::empty({step, out, in}, fisher.options());
  for (int64_t n0 = 0; n0 < n; n0 += step) {
    const int64_t b = std::min(step, n - n0);
    at::Tensor t = tile.narrow(0, 0, b);
    // [b, out, T] @ [b, T, in] -> the b per-sample weight gradients of this tile.
    at::bmm_out(t, grad_out.narrow(0, n0, b).transpose(1, 2).to(acc), x.narrow(0, n0, b).to(acc));
    square_accumulate(fisher, t, scale);
  }
}

}  // namespace fisheradaptune
