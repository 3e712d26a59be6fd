// Group layouts as the kernels see them.
//
// A layout is an int64 tensor of segments [S, 4] = (tensor_index, begin, end, group_id): the
// elements [begin, end) of the flattened tensor `tensor_index` belong to group `group_id`.
// read_segments() validates it; make_plan() cuts the tensors into chunks of at most kChunk
// elements that never cross a segment boundary (Note [Chunk and block sizes] below).
// (Transitional: the classic-ATen read_segments of the files not yet on the stable ABI.)
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "common/plan.h"

namespace fisheradaptune {
// Transitional (Note [Stable ABI], common/stable.h): the classic-ATen helpers live in an inline
// namespace so that they never share a symbol with their common/ twins in the same library.
inline namespace classic {


// Validates `segments` (int64 [S, 4]) against the tensor sizes and the number of groups:
// indices in range, 0 <= begin <= end <= numel, no two segments overlapping. Empty segments are
// dropped. Raises ValueError naming `arg`.
//
// Note [Segments on the host]
// Kernels plan their work on the host, so the segments are read there. A CPU tensor (what the
// Python wrappers pass: GroupLayout.segments) is read in place and the op stays asynchronous
// on CUDA. A CUDA tensor is accepted but copied to the host first, which SYNCHRONISES with the
// device (and is refused under CUDA-graph capture, see mt::check_not_capturing); any other
// device (meta, ...) is refused with a ValueError naming `arg`.
std::vector<Segment> read_segments(const char* op, const char* arg, const at::Tensor& segments,
                                   const std::vector<int64_t>& numels, int64_t num_groups);

}  // inline namespace classic
}  // namespace fisheradaptune
