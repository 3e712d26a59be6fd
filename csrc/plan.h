// Group layouts as the kernels see them.
//
// A layout is an int64 tensor of segments [S, 4] = (tensor_index, begin, end, group_id): the
// elements [begin, end) of the flattened tensor `tensor_index` belong to group `group_id`.
// read_segments() validates it; make_plan() cuts the tensors into fixed-size chunks that never
// cross a segment boundary. Chunking depends only on the layout and the chunk size, never on
// the number of threads or blocks, which is what makes every reduction deterministic: each
// chunk produces one partial, and a group's partials are added in plan order.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fisheradaptune {

struct Segment {
  int64_t tensor, begin, end, group;
};

// Elements [begin, end) of tensor `tensor`; group -1 means "in no group".
struct Chunk {
  int64_t tensor, begin, end, group;
};

struct Plan {
  std::vector<Chunk> chunks;  // ordered by tensor, then begin; no element appears twice
  // CSR over the chunks of each group, in plan order: group g owns
  // chunks[group_chunks[k]] for k in [group_offsets[g], group_offsets[g + 1]).
  std::vector<int64_t> group_offsets;
  std::vector<int64_t> group_chunks;
};

// Validates `segments` (int64 [S, 4], on any device: copied to the host) against the tensor
// sizes and the number of groups: indices in range, 0 <= begin <= end <= numel, no two
// segments overlapping. Empty segments are dropped. Raises ValueError naming `arg`.
std::vector<Segment> read_segments(const char* op, const char* arg, const at::Tensor& segments,
                                   const std::vector<int64_t>& numels, int64_t num_groups);

// Cuts the segments into chunks of at most `chunk_size` elements. With `cover_gaps`, the
// elements of each tensor that no segment covers become chunks of group -1, so that a pass
// over the plan visits every element exactly once.
Plan make_plan(const std::vector<Segment>& segments, const std::vector<int64_t>& numels,
               int64_t num_groups, int64_t chunk_size, bool cover_gaps);

}  // namespace fisheradaptune
