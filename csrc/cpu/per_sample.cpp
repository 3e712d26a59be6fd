// CPU kernel of per_sample_grad_sq_: BLAS batched GEMM per tile, then a vectorised, parallel
// square-and-accumulate over the tile's samples.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "per_sample.h"

namespace fisheradaptune {
namespace {

constexpr int64_t kTileElems = int64_t(1) << 22;  // 16 MiB of float32 per-sample gradients

void square_accumulate_cpu(const at::Tensor& fisher, const at::Tensor& tile, double scale) {
  const int64_t b = tile.size(0), m = fisher.numel();
  AT_DISPATCH_FLOATING_TYPES(fisher.scalar_type(), "square_accumulate_cpu", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    constexpr int64_t W = Vec::size();
    scalar_t* f = fisher.data_ptr<scalar_t>();
    const scalar_t* t = tile.const_data_ptr<scalar_t>();
    const auto s = static_cast<scalar_t>(scale);
    at::parallel_for(0, m, 1 << 14, [&](int64_t lo, int64_t hi) {
      int64_t j = lo;
      for (; j + W <= hi; j += W) {
        Vec acc(scalar_t(0));
        for (int64_t k = 0; k < b; ++k) {
          const Vec v = Vec::loadu(t + k * m + j);
          acc = at::vec::fmadd(v, v, acc);
        }
        at::vec::fmadd(acc, Vec(s), Vec::loadu(f + j)).store(f + j);
      }
      for (; j < hi; ++j) {
        scalar_t acc = 0;
        for (int64_t k = 0; k < b; ++k) acc += t[k * m + j] * t[k * m + j];
        f[j] += s * acc;
      }
    });
  });
}

void per_sample_grad_sq_cpu(const at::Tensor& fisher, const at::Tensor& x,
                            const at::Tensor& grad_out, double scale) {
  per_sample_grad_sq(fisher, x, grad_out, scale, kTileElems, &square_accumulate_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fisheradaptune, CPU, m) {
  m.impl("per_sample_grad_sq_", &per_sample_grad_sq_cpu);
}

}  // namespace fisheradaptune
