// Chunked multi-tensor launches for fisheradaptune's CUDA kernels (ATen's MultiTensorApply is
// internal, and its kernel-argument tables cap the number of tensors per launch).
//
// Note [Chunk table]
// The host cuts the tensors into chunks with make_plan (plan.h) and writes one small descriptor
// per chunk (pointers already offset to the chunk, element count, group). The whole table, and
// any other per-call arrays, travel to the device in ONE asynchronous copy from pinned memory
// (DeviceBundle). One kernel then walks the table with a grid-stride loop, one block per chunk,
// so a launch handles any number of tensors of any size with a fixed, tiny argument list.
// Empty tensors produce no chunks, and a table without chunks launches nothing.
//
// Note [Group order]
// Ops that report per-group sums order the table with grouped chunks first, group by group,
// each group's chunks in plan order (that is Plan::group_chunks), and chunks of no group last.
// The chunk in table slot k writes its partial to partials[k], so group g's partials are
// partials[group_offsets[g] .. group_offsets[g + 1]), contiguous and in plan order, and a
// group's chunks form one contiguous slice of the table (histogram passes launch on batches of
// groups this way).
//
// Note [Fixed-shape reductions]
// Determinism comes from shapes, never from scheduling: a thread's share of a chunk depends only
// on the chunk's length, its alignment and the fixed block size kThreads; a block combines its
// threads with one fixed shuffle tree (block_sum); a group combines its chunk partials with the
// same fixed pattern in one block (group_kernel). No float atomics anywhere: only integer
// atomics (exact and order-independent) for counters and histograms. Results are therefore
// bitwise identical run to run on a given device.
//
// Note [Vector alignment]
// A chunk starts at a segment boundary, which can be any element, and tensors can carry
// storage offsets, so 16-byte loads are only used from the first element `head` at which
// every pointer of the chunk is 16-byte aligned (aligned_head); the elements before it and the
// tail after the last whole vector take the scalar path. When no element within one vector
// aligns all pointers together, the whole chunk takes the scalar path.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "plan.h"

namespace fisheradaptune {
// Transitional (Note [Stable ABI], common/stable.h): the classic-ATen helpers live in an inline
// namespace so that they never share a symbol with their common/ twins in the same library.
inline namespace classic {

namespace mt {

// Every kernel of the extension runs blocks of kThreads threads; the reductions below rely on
// it being a fixed multiple of the warp size (Note [Fixed-shape reductions]).
//
// Note [Launch resources]
// A launch that asks for more than a block may have fails only when it runs, on a GPU ("too
// many resources requested for launch"). So the per-block limits hold by construction, and CI
// checks them without a GPU:
//   - threads: every kernel declares __launch_bounds__(kThreads) and every launch uses kThreads,
//     the one named constant shared by the bound and the launch (tests/ops/test_cuda_contract.py
//     checks both in the sources). ptxas then limits the registers so that a block of kThreads
//     threads fits: registers x threads <= 65536.
//   - shared memory: a block's static (__shared__ arrays) plus dynamic shared memory stays within
//     the 48 KiB a block gets without opting in (no launch opts in): dynamic shared memory is at
//     most kMaxDynamicSmem, for the three kernels that take any (token_prune_merge's
//     select_kernel, bipartite_merge's plan_kernel, js_drift's BinCountOp), whose static part is
//     small.
//   - spills: a kernel that spills registers to local memory says why in a comment at the kernel
//     (none does today).
// tools/cuda_resources.py reads every kernel's registers, spills and static shared memory for
// sm_80 and sm_90 from the built library (cuobjdump) and fails CI (.ci/integration.sh) when a
// limit is exceeded or a spill is unexplained; it prints the table of all kernels.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
static_assert(kThreads % 32 == 0 && kWarps <= 32, "block reductions assume whole warps");
// The most dynamic shared memory a launch asks for (Note [Launch resources]).
constexpr int64_t kMaxDynamicSmem = 32 * 1024;
// Grid cap: beyond it the grid-stride loops take over, so the count never limits a launch.
constexpr int64_t kMaxGrid = int64_t(1) << 20;

// ---------------------------------------------------------------------------------------------
// Host side

// Note [No CUDA-graph capture]
// Ops that upload a chunk table (DeviceBundle) or read a value back (sampled_grad's index check,
// device segments, Note [Segments on the host] in plan.h) cannot be captured into a CUDA graph:
// a replay would re-read the pinned host buffer of the upload after the caching host allocator
// has handed it to someone else, and a read-back is illegal while capturing. Such ops call
// check_not_capturing first, before validation or any launch, so a capture attempt fails with a
// clear error and leaves the capture (and every argument) untouched. Call the op outside the
// captured region.
// `on`: the tensor whose device the op runs on (its current stream is the one checked); a
// non-CUDA tensor (bad input that validation will name) checks the current device's stream.
inline void check_not_capturing(const char* op, const char* why, const at::Tensor& on) {
  const c10::cuda::OptionalCUDAGuard guard(
      on.defined() && on.is_cuda() ? std::optional<c10::Device>(on.device()) : std::nullopt);
  const c10::cuda::CaptureStatus status = c10::cuda::currentStreamCaptureStatusMayInitCtx();
  TORCH_CHECK(status == c10::cuda::CaptureStatus::None, "fisheradaptune.", op,
              ": cannot be captured in a CUDA graph (the current stream is capturing): ", why,
              ". Call it outside the captured region.");
}

// Per-call arrays gathered into one byte buffer and uploaded in one copy (Note [Chunk table]).
// The copy is asynchronous on the current stream from a pinned buffer of the caching host
// allocator; copy_ records the stream on that buffer, so it is not reused before the copy ends.
// Not capturable (Note [No CUDA-graph capture]): upload() asserts that no capture is active,
// the ops themselves refuse it with a clear error before doing anything.
class DeviceBundle {
 public:
  // Appends `count` items; returns their byte offset, 16-byte aligned so that any array can be
  // read with vector loads and any descriptor struct is naturally aligned.
  template <typename T>
  int64_t add(const T* data, size_t count) {
    static_assert(std::is_trivially_copyable_v<T>, "bundle items are copied bytewise");
    static_assert(alignof(T) <= 16, "bundle offsets are 16-byte aligned");
    TORCH_INTERNAL_ASSERT(!device_.defined(), "DeviceBundle: add after upload");
    const size_t offset = (bytes_.size() + 15) & ~size_t(15);
    bytes_.resize(offset + count * sizeof(T));
    if (count > 0) std::memcpy(bytes_.data() + offset, data, count * sizeof(T));
    return static_cast<int64_t>(offset);
  }
  template <typename T>
  int64_t add(const std::vector<T>& v) {
    return add(v.data(), v.size());
  }

  void upload(const c10::Device& device) {
    TORCH_INTERNAL_ASSERT(!device_.defined(), "DeviceBundle: uploaded twice");
    if (bytes_.empty()) return;
    TORCH_INTERNAL_ASSERT(c10::cuda::currentStreamCaptureStatusMayInitCtx() ==
                              c10::cuda::CaptureStatus::None,
                          "DeviceBundle: upload while capturing (Note [No CUDA-graph capture])");
    const int64_t n = static_cast<int64_t>(bytes_.size());
    at::Tensor pinned =
        at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(pinned.mutable_data_ptr(), bytes_.data(), bytes_.size());
    device_ = at::empty({n}, at::TensorOptions().dtype(at::kByte).device(device));
    device_.copy_(pinned, /*non_blocking=*/true);
  }

  // Device address of the array added at `offset` (null when nothing was uploaded).
  template <typename T>
  T* get(int64_t offset) const {
    if (!device_.defined()) return nullptr;
    return reinterpret_cast<T*>(static_cast<unsigned char*>(device_.mutable_data_ptr()) + offset);
  }

 private:
  std::vector<unsigned char> bytes_;
  at::Tensor device_;
};

// Chunk indices of `plan` in group order (Note [Group order]); chunks of no group are appended
// in plan order when `with_ungrouped`.
inline std::vector<int64_t> group_ordered(const Plan& plan, bool with_ungrouped) {
  std::vector<int64_t> order(plan.group_chunks.begin(), plan.group_chunks.end());
  if (with_ungrouped) {
    for (int64_t k = 0; k < static_cast<int64_t>(plan.chunks.size()); ++k) {
      if (plan.chunks[k].group < 0) order.push_back(k);
    }
  }
  return order;
}

// ---------------------------------------------------------------------------------------------
// Device side: the harness. Functors are plain structs (no extended lambdas), copied into the
// kernel's parameters; their operator() runs once per chunk (or group) with the whole block and
// may use __syncthreads, because every thread of a block walks the same loop.

template <typename Desc, typename Op>
__global__ void __launch_bounds__(kThreads)
    chunk_kernel(const Desc* __restrict__ table, int64_t count, Op op) {
  for (int64_t k = blockIdx.x; k < count; k += gridDim.x) {
    const Desc d = table[k];
    op(d, k);
    // A functor may reuse shared memory on its next chunk: finish this one first.
    __syncthreads();
  }
}

template <typename Op>
__global__ void __launch_bounds__(kThreads) group_kernel(int64_t count, Op op) {
  for (int64_t g = blockIdx.x; g < count; g += gridDim.x) {
    op(g);
    __syncthreads();
  }
}

inline unsigned grid_for(int64_t count) {
  return static_cast<unsigned>(std::min<int64_t>(count, kMaxGrid));
}

// One block per chunk of table[0, count), slot k passed to op. No launch for an empty table.
template <typename Desc, typename Op>
void launch_chunks(const Desc* table, int64_t count, const Op& op, cudaStream_t stream,
                   size_t dynamic_smem = 0) {
  if (count <= 0) return;
  TORCH_INTERNAL_ASSERT(dynamic_smem <= static_cast<size_t>(kMaxDynamicSmem));
  chunk_kernel<Desc, Op><<<grid_for(count), kThreads, dynamic_smem, stream>>>(table, count, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One block per index in [0, count).
template <typename Op>
void launch_groups(int64_t count, const Op& op, cudaStream_t stream) {
  if (count <= 0) return;
  group_kernel<Op><<<grid_for(count), kThreads, 0, stream>>>(count, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Device side: fixed-shape block primitives (Note [Fixed-shape reductions]). Every thread of the
// block must call them (they synchronise); they may be called back to back.

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; the result is valid in thread 0 only.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T warp_part[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  T r = T(0);
  if (warp == 0) r = warp_sum(lane < kWarps ? warp_part[lane] : T(0));
  __syncthreads();  // warp_part may be rewritten by the next call
  return r;
}

// Sum over the block, returned to every thread.
template <typename T>
__device__ T block_sum_all(T v) {
  __shared__ T total;
  const T r = block_sum(v);
  if (threadIdx.x == 0) total = r;
  __syncthreads();
  const T out = total;
  __syncthreads();
  return out;
}

// Exclusive prefix sum over threads in threadIdx order.
template <typename T>
__device__ T block_exclusive_scan(T v) {
  __shared__ T warp_base[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T up = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += up;
  }
  if (lane == 31) warp_base[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    const T w = lane < kWarps ? warp_base[lane] : T(0);
    T winc = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const T up = __shfl_up_sync(0xffffffffu, winc, o);
      if (lane >= o) winc += up;
    }
    if (lane < kWarps) warp_base[lane] = winc - w;
  }
  __syncthreads();
  const T out = warp_base[warp] + inc - v;
  __syncthreads();
  return out;
}

// First element index at which `a` (elements of a_bytes) and, if given, `b` are both 16-byte
// aligned, looking `vec` elements ahead; n when there is none (Note [Vector alignment]).
__device__ __forceinline__ int64_t aligned_head(int64_t n, int vec, const void* a, int a_bytes,
                                                const void* b = nullptr, int b_bytes = 0) {
  const uintptr_t pa = reinterpret_cast<uintptr_t>(a);
  const uintptr_t pb = reinterpret_cast<uintptr_t>(b);
  for (int h = 0; h < vec; ++h) {
    const bool ok_a = (pa + uintptr_t(h) * uintptr_t(a_bytes)) % 16 == 0;
    const bool ok_b = b == nullptr || (pb + uintptr_t(h) * uintptr_t(b_bytes)) % 16 == 0;
    if (ok_a && ok_b) return h < n ? h : n;
  }
  return n;
}

// Visits [0, n) of a chunk with the block: scalar(i) on [0, head) and on the tail, vector(i) on
// each whole vector of kVec elements starting at i >= head. The assignment of elements to
// threads depends only on n, head and kThreads (Note [Fixed-shape reductions]).
template <int kVec, typename Scalar, typename Vector>
__device__ __forceinline__ void split_loop(int64_t n, int64_t head, Scalar&& scalar,
                                           Vector&& vector) {
  const int64_t nvec = (n - head) / kVec;
  const int64_t tail = head + nvec * kVec;
  for (int64_t i = threadIdx.x; i < head; i += kThreads) scalar(i);
  for (int64_t v = threadIdx.x; v < nvec; v += kThreads) vector(head + v * kVec);
  for (int64_t i = tail + threadIdx.x; i < n; i += kThreads) scalar(i);
}

// Sum of partials[begin, end) over the block, valid in thread 0; the per-group half of
// Note [Group order].
__device__ __forceinline__ double slot_sum(const double* partials, int64_t begin, int64_t end) {
  double s = 0.0;
  for (int64_t k = begin + threadIdx.x; k < end; k += kThreads) s += partials[k];
  return block_sum(s);
}

// A token row copied by the block (kThreads threads): 16-byte vectors when both rows are aligned
// and the row is whole vectors, else element by element; bitwise either way. Used by the token
// kernels (tokens/token_prune_merge_cuda.cu, tokens/bipartite_merge_cuda.cu).
template <typename T>
__device__ __forceinline__ void copy_row(T* __restrict__ dst, const T* __restrict__ from,
                                         int64_t C) {
  const int64_t bytes = C * static_cast<int64_t>(sizeof(T));
  if (bytes % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(from) % 16 == 0) {
    const int64_t nv = bytes / 16;
    uint4* d = reinterpret_cast<uint4*>(dst);
    const uint4* f = reinterpret_cast<const uint4*>(from);
    for (int64_t v = threadIdx.x; v < nv; v += kThreads) d[v] = f[v];
  } else {
    for (int64_t c = threadIdx.x; c < C; c += kThreads) dst[c] = from[c];
  }
}

}  // namespace mt
}  // inline namespace classic
}  // namespace fisheradaptune
