#include "fisher/per_sample_grad_sq.h"

#include <ATen/Context.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <torch/version.h>

#include <algorithm>


namespace fisheradaptune {

namespace {

// Note [Full fp32 per-sample GEMM]
// The per-sample gradients are squared and summed, so a GEMM rounded to TF32 (10-bit mantissa;
// cuBLAS under torch.set_float32_matmul_precision("high"/"medium")) or to bfloat16 (oneDNN on
// CPU under "medium") would lose most of the precision of the Fisher. For the duration of the
// op this guard forces full IEEE fp32 for float32 matmuls on the tile's backend and restores the
// caller's setting afterwards (also when the op throws):
//   - at::NoTF32Guard: thread-local, honoured by the cuBLAS handle's math mode;
//   - the global float32 matmul precision of the backend (cuBLAS, cuBLASLt and oneDNN read it),
//     saved, set to "ieee"/"highest" only if it is not already, and restored. This is process
//     global state: another thread that runs a float32 matmul while this op runs also gets full
//     fp32 (slower, never less precise).
// float64 tiles (CPU) need nothing.
class FullFp32Matmul {
 public:
  explicit FullFp32Matmul(const at::Tensor& like) {
    if (like.scalar_type() != at::kFloat) return;
    at::Context& ctx = at::globalContext();
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
    backend_ = like.is_cuda() ? at::Float32Backend::CUDA : at::Float32Backend::MKLDNN;
    saved_ = ctx.float32Precision(backend_, at::Float32Op::MATMUL);
    if (saved_ != at::Float32Precision::IEEE) {
      ctx.setFloat32Precision(backend_, at::Float32Op::MATMUL, at::Float32Precision::IEEE);
      changed_ = true;
    }
#else
    saved_ = ctx.float32MatmulPrecision();
    if (saved_ != at::Float32MatmulPrecision::HIGHEST) {
      ctx.setFloat32MatmulPrecision("highest");
      changed_ = true;
    }
#endif
  }
  ~FullFp32Matmul() {
    if (!changed_) return;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
    at::globalContext().setFloat32Precision(backend_, at::Float32Op::MATMUL, saved_);
#else
    at::globalContext().setFloat32MatmulPrecision(
        saved_ == at::Float32MatmulPrecision::HIGH ? "high" : "medium");
#endif
  }
  FullFp32Matmul(const FullFp32Matmul&) = delete;
  FullFp32Matmul& operator=(const FullFp32Matmul&) = delete;

 private:
  at::NoTF32Guard no_tf32_;
  bool changed_ = false;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  at::Float32Backend backend_ = at::Float32Backend::CUDA;
  at::Float32Precision saved_ = at::Float32Precision::IEEE;
#else
  at::Float32MatmulPrecision saved_ = at::Float32MatmulPrecision::HIGHEST;
#endif
};

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
void per_sample_grad_sq(const at::Tensor& fisher, const at::Tensor& x, const at::Tensor& grad_out,
                        double scale, const at::Tensor& nonfinite, int64_t tile_elems,
                        SquareAccumulateFn square_accumulate) {
  validate_per_sample_grad_sq(fisher, x, grad_out, scale, nonfinite);
  nonfinite.zero_();  // the op overwrites the count, also when there is no work
  const int64_t n = x.size(0), out = fisher.size(0), in = fisher.size(1);
  if (n == 0 || fisher.numel() == 0) return;
  // An empty token axis gives zero per-sample gradients: nothing to add.
  if (x.size(1) == 0) return;
  const int64_t per_sample = out * in;
  const int64_t step = std::clamp<int64_t>(tile_elems / per_sample, 1, n);
  const auto acc = fisher.scalar_type();
  at::Tensor tile = at::empty({step, out, in}, fisher.options());
  // One tile's worth of sums between tiles; none when a single tile holds every sample.
  const at::Tensor carry = step < n ? at::empty({out, in}, fisher.options()) : at::Tensor();
  const FullFp32Matmul full_fp32(tile);  // Note [Full fp32 per-sample GEMM]
  for (int64_t n0 = 0; n0 < n; n0 += step) {
    const int64_t b = std::min(step, n - n0);
    at::Tensor t = tile.narrow(0, 0, b);
    // [b, out, T] @ [b, T, in] -> the b per-sample weight gradients of this tile.
    at::bmm_out(t, grad_out.narrow(0, n0, b).transpose(1, 2).to(acc), x.narrow(0, n0, b).to(acc));
    square_accumulate(fisher, t, scale, carry, /*first=*/n0 == 0, /*last=*/n0 + b == n,
                      nonfinite);
  }
}

}  // namespace fisheradaptune
