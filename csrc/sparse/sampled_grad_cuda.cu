// CUDA kernel of sampled_grad (Note [Sampled gradient], csrc/sparse/sampled_grad.h; CPU twin:
// csrc/sparse/sampled_grad_cpu.cpp). grad_out and x are transposed once to [out, T] and [in, T] in
// the accumulation type, so each output element is a dot product of two contiguous rows. One warp
// per output element (grid-stride over the out * C elements): the lanes read coalesced strides of
// the two rows, accumulate their share in index order and combine by a fixed-tree warp sum
// (warp_sum, common/multi_tensor.cuh). No atomics: bitwise deterministic. validate_sampled_grad
// checks the index range before the launch (one synchronisation, Note [Sampled gradient]) unless
// the caller passed index_checked; the kernel still guards every read, so a stale flag, or an
// index rewritten concurrently by another stream, yields NaN for that element, never an
// out-of-bounds read (Note [Checked indices], sparse/sampled_grad_args.cpp).
#include "common/validate.h"

#include <algorithm>
#include <limits>

#include "common/multi_tensor.cuh"
#include "sparse/sampled_grad.h"

namespace fisheradaptune {
namespace {

using mt::kThreads;
using mt::kWarps;

constexpr int64_t kMaxBlocks = 1 << 16;

template <typename A>
__global__ void __launch_bounds__(kThreads)
    sampled_grad_kernel(const A* __restrict__ g, const A* __restrict__ xs,
                        const int64_t* __restrict__ index, A* __restrict__ out, int64_t T,
                        int64_t K, int64_t C, int64_t count) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t e = warp; e < count; e += stride) {  // uniform per warp
    const int64_t i = e / C;
    const int64_t col = index[e];
    if (col < 0 || col >= K) {
      if (lane == 0) out[e] = std::numeric_limits<A>::quiet_NaN();
      continue;
    }
    const A* gi = g + i * T;
    const A* xc = xs + col * T;
    A acc = 0;
    for (int64_t t = lane; t < T; t += 32) acc += gi[t] * xc[t];
    acc = mt::warp_sum(acc);
    if (lane == 0) out[e] = acc;
  }
}

Tensor sampled_grad_cuda(Tensor grad_out, Tensor x, Tensor index, bool index_checked) {
  mt::check_not_capturing("sampled_grad", "its index range check reads the index's min and max "
                          "back to the host", grad_out);
  const SampledGradArgs a = validate_sampled_grad(grad_out, x, index, index_checked);
  const mt::TensorDeviceGuard guard(a.grad_out);
  const int64_t T = a.tokens, R = a.rows, K = a.cols, C = a.picks;
  if (T == 0 || R * C == 0) return zeros({R, C}, a.out_dtype, a.grad_out.device());
  const cudaStream_t stream = mt::current_stream(a.grad_out.get_device_index());
  Tensor out = empty({R, C}, a.out_dtype, a.grad_out.device());
  const Tensor gt = st::contiguous(st::to(st::transpose(a.grad_out, 0, 1), a.out_dtype));
  const Tensor xt = st::contiguous(st::to(st::transpose(a.x, 0, 1), a.out_dtype));
  const int64_t count = R * C;
  const int64_t blocks = std::min<int64_t>(kMaxBlocks, (count + kWarps - 1) / kWarps);
  FAT_DISPATCH_FLOATING(a.out_dtype, "sampled_grad_cuda", [&] {
    sampled_grad_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        gt.const_data_ptr<scalar_t>(), xt.const_data_ptr<scalar_t>(),
        a.index.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), T, K, C, count);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fisheradaptune, CUDA, m) {
  m.impl("sampled_grad", TORCH_BOX(&sampled_grad_cuda));
}

}  // namespace fisheradaptune
