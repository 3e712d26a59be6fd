#include "common/stable.h"

#include "fisher/per_sample_grad_sq.h"

#include <algorithm>
#include <array>

namespace fisheradaptune {

namespace {

// Note [Full fp32 per-sample GEMM]
// The per-sample gradients are squared and summed, so a GEMM rounded to TF32 (10-bit mantissa;
// cuBLAS under torch.set_float32_matmul_precision("high"/"medium")) or to bfloat16 (oneDNN on
// CPU under "medium") would lose most of the precision of the Fisher. The GEMM is ATen's bmm,
// called through the dispatcher, so it follows the process's float32 matmul precision, and the
// stable ABI offers no way to set or guard that precision from C++ (no shim function or ATen
// op does). The typed wrapper fisheradaptune.ops.per_sample_grad_sq_ therefore sets full IEEE
// fp32 for float32 matmuls (cuBLAS and oneDNN) around the call and restores the caller's
// settings afterwards, also when the op throws (fisheradaptune/ops/_library.py,
// full_fp32_matmul, which also says why it sets the legacy setting and the per-backend flags
// together). That is process-global state: another thread that runs a float32 matmul
// meanwhile also gets full fp32 (slower, never less precise). A raw
// torch.ops.fisheradaptune.per_sample_grad_sq_ call follows the caller's matmul precision.
// float64 tiles (CPU) need nothing.

// out = self @ mat2, batched (aten::bmm.out through the dispatcher: Note [Stable ABI],
// common/stable.h).
void bmm_out(const Tensor& out, const Tensor& self, const Tensor& mat2) {
  std::array<StableIValue, 3> stack{st::detail::from(self), st::detail::from(mat2),
                                    st::detail::from(out)};
  call_op("aten::bmm", "out", stack);
  // The op returns an alias of `out`: take it, so that its handle is released.
  (void)st::detail::to<Tensor>(stack[0]);
}

}  // namespace

// Note [Skipping in per_sample_grad_sq_]
// As fisher_accumulate_ (Note [Skipping], fisher/fisher_accumulate_cpu.cpp), an element whose
// update would not be finite keeps its Fisher value and is counted, so one NaN or Inf in x or
// grad_out (or a per-sample square that overflows the state's dtype) cannot poison the Fisher for
// good. The update of an element is the whole call's, fisher[j] + scale * sum_n g_n[j]^2: the
// running sum of squares is carried from tile to tile in a buffer like the Fisher (`carry`) and the
// Fisher is written once, at the last tile. Hence
//   - the skip decision does not depend on the tiling (which differs between CPU and CUDA), and
//     a skipped element keeps the value it had before the call, not a partial sum;
//   - each element sums its squares in sample order, continuing one chain across tiles, so the
//     accumulation is that of one tile holding every sample, wherever the boundaries fall (the
//     per-sample gradients themselves are the backend GEMM's);
//   - the sum of squares is in the state's dtype, so a sum that overflows it is non-finite even
//     when a small `scale` would have brought the product back into range.
// The count is of Fisher elements, at most out * in per call, written (not added) to
// `nonfinite`. A call with no samples, no tokens or an empty Fisher performs no update: nothing is
// written and the count is 0.
void per_sample_grad_sq(const Tensor& fisher, const Tensor& x, const Tensor& grad_out,
                        double scale, const Tensor& nonfinite, int64_t tile_elems,
                        SquareAccumulateFn square_accumulate) {
  validate_per_sample_grad_sq(fisher, x, grad_out, scale, nonfinite);
  Tensor count = nonfinite;  // a handle (st::zero_ takes a non-const reference)
  st::zero_(count);          // the op overwrites the count, also when there is no work
  const int64_t n = x.size(0), out = fisher.size(0), in = fisher.size(1);
  if (n == 0 || fisher.numel() == 0) return;
  // An empty token axis gives zero per-sample gradients: nothing to add.
  if (x.size(1) == 0) return;
  const int64_t per_sample = out * in;
  const int64_t step = std::clamp<int64_t>(tile_elems / per_sample, 1, n);
  const ScalarType acc = fisher.scalar_type();
  const Device device = fisher.device();
  Tensor tile = empty({step, out, in}, acc, device);
  // One tile's worth of sums between tiles; none when a single tile holds every sample.
  const Tensor carry = step < n ? empty({out, in}, acc, device) : Tensor();
  Tensor xs = x, gs = grad_out;  // handles for st::narrow (non-const references)
  for (int64_t n0 = 0; n0 < n; n0 += step) {
    const int64_t b = std::min(step, n - n0);
    const Tensor t = b == step ? tile : st::narrow(tile, 0, 0, b);
    // [b, out, T] @ [b, T, in] -> the b per-sample weight gradients of this tile, in full fp32
    // when called through the typed wrapper (Note [Full fp32 per-sample GEMM]).
    const Tensor go = st::to(st::transpose(st::narrow(gs, 0, n0, b), 1, 2), acc);
    const Tensor xt = st::to(st::narrow(xs, 0, n0, b), acc);
    bmm_out(t, go, xt);
    square_accumulate(fisher, t, scale, carry, /*first=*/n0 == 0, /*last=*/n0 + b == n,
                      nonfinite);
  }
}

}  // namespace fisheradaptune
