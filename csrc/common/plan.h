// Group layouts as the kernels see them: the work plan.
//
// A layout is an int64 tensor of segments [S, 4] = (tensor_index, begin, end, group_id): the
// elements [begin, end) of the flattened tensor `tensor_index` belong to group `group_id`.
// read_segments() (common/validate.h) validates it; make_plan() cuts the tensors into chunks of
// at most kChunk elements that never cross a segment boundary (Note [Chunk and block sizes]).
// No torch header: the plan is plain host data.
#pragma once

#include <cstdint>
#include <vector>

namespace fisheradaptune {

// Note [Chunk and block sizes]: the sizes the kernels cut their work by, defined once here and
// exported to Python as the module constants fisheradaptune._C.CHUNK and BLOCK (schemas.cpp).
//
// kChunk: elements per chunk of a Plan. The chunk is the unit of deterministic reduction: each
// chunk yields exactly one partial (e.g. a sum and a count), computed by one thread on CPU or
// one block on CUDA, and a group adds its chunks' partials in plan order. Since the cut
// depends only on the layout and kChunk, never on how many threads or blocks run, the result
// is bitwise the same for any thread count. It is also the unit of parallel work (32K elements:
// enough to amortise a task or a block, small enough to balance ViT-sized lists).
constexpr int64_t kChunk = int64_t(1) << 15;
// kBlock: inside a chunk (and in common/simd.h's blocked_dot), the CPU kernels accumulate in
// vector lanes (float lanes for float data) over at most kBlock elements, then add that block's
// sum into a double, so long runs keep their precision while the inner loop stays vectorised
// (Note [CPU vectorisation], common/simd.h).
// CUDA kernels do not use it: each thread accumulates its own share of a chunk
// (Note [Fixed-shape reductions], common/multi_tensor.cuh).
constexpr int64_t kBlock = 1024;
static_assert(kChunk % kBlock == 0, "a chunk holds whole blocks");

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

// Cuts the segments into chunks of at most `chunk_size` elements. With `cover_gaps`, the
// elements of each tensor that no segment covers become chunks of group -1, so that a pass
// over the plan visits every element exactly once.
Plan make_plan(const std::vector<Segment>& segments, const std::vector<int64_t>& numels,
               int64_t num_groups, int64_t chunk_size, bool cover_gaps);

}  // namespace fisheradaptune
