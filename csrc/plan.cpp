#include "plan.h"

#include <algorithm>

#include "validate.h"

namespace fisheradaptune {

std::vector<Segment> read_segments(const char* op, const char* arg, const at::Tensor& segments,
                                   const std::vector<int64_t>& numels, int64_t num_groups) {
  FAT_CHECK_TYPE(segments.scalar_type() == at::kLong, op, arg, "expected int64, got ",
                 segments.scalar_type());
  FAT_CHECK_VALUE(segments.dim() == 2 && segments.size(1) == 4, op, arg,
                  "expected shape [S, 4] (tensor_index, begin, end, group_id), got ",
                  segments.sizes());
  // Note [Segments on the host] (plan.h): CPU read in place; CUDA copied (synchronises).
  FAT_CHECK_VALUE(segments.device().is_cpu() || segments.device().is_cuda(), op, arg,
                  "expected a CPU tensor (kernels plan on the host; GroupLayout.segments is the ",
                  "CPU copy), got one on ", segments.device());
  const at::Tensor host = segments.device().is_cpu() ? segments.contiguous()
                                                     : segments.cpu().contiguous();
  const int64_t* s = host.const_data_ptr<int64_t>();
  const int64_t n = host.size(0);
  const int64_t num_tensors = static_cast<int64_t>(numels.size());
  std::vector<Segment> out;
  out.reserve(n);
  for (int64_t r = 0; r < n; ++r) {
    const Segment seg{s[4 * r], s[4 * r + 1], s[4 * r + 2], s[4 * r + 3]};
    FAT_CHECK_VALUE(seg.tensor >= 0 && seg.tensor < num_tensors, op, arg, "row ", r,
                    ": tensor_index ", seg.tensor, " is out of range for ", num_tensors,
                    " tensors");
    FAT_CHECK_VALUE(seg.begin >= 0 && seg.begin <= seg.end && seg.end <= numels[seg.tensor], op,
                    arg, "row ", r, ": range [", seg.begin, ", ", seg.end,
                    ") is out of bounds for tensor ", seg.tensor, " with ", numels[seg.tensor],
                    " elements");
    FAT_CHECK_VALUE(seg.group >= 0 && seg.group < num_groups, op, arg, "row ", r, ": group_id ",
                    seg.group, " is out of range for ", num_groups, " groups");
    if (seg.begin < seg.end) out.push_back(seg);
  }
  std::stable_sort(out.begin(), out.end(), [](const Segment& a, const Segment& b) {
    return a.tensor != b.tensor ? a.tensor < b.tensor : a.begin < b.begin;
  });
  for (size_t i = 1; i < out.size(); ++i) {
    const Segment& a = out[i - 1];
    const Segment& b = out[i];
    FAT_CHECK_VALUE(a.tensor != b.tensor || a.end <= b.begin, op, arg, "segments [", a.begin,
                    ", ", a.end, ") and [", b.begin, ", ", b.end, ") of tensor ", a.tensor,
                    " overlap");
  }
  return out;
}

Plan make_plan(const std::vector<Segment>& segments, const std::vector<int64_t>& numels,
               int64_t num_groups, int64_t chunk_size, bool cover_gaps) {
  TORCH_INTERNAL_ASSERT(chunk_size > 0);
  Plan plan;
  auto emit = [&](int64_t tensor, int64_t begin, int64_t end, int64_t group) {
    for (int64_t b = begin; b < end; b += chunk_size) {
      plan.chunks.push_back({tensor, b, std::min(end, b + chunk_size), group});
    }
  };
  size_t next = 0;  // segments are sorted by (tensor, begin)
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    int64_t pos = 0;
    for (; next < segments.size() && segments[next].tensor == t; ++next) {
      const Segment& s = segments[next];
      if (cover_gaps) emit(t, pos, s.begin, -1);
      emit(t, s.begin, s.end, s.group);
      pos = s.end;
    }
    if (cover_gaps) emit(t, pos, numels[t], -1);
  }
  // Counting sort of chunk ids by group keeps each group's chunks in plan order.
  plan.group_offsets.assign(num_groups + 1, 0);
  for (const Chunk& c : plan.chunks) {
    if (c.group >= 0) ++plan.group_offsets[c.group + 1];
  }
  for (int64_t g = 0; g < num_groups; ++g) plan.group_offsets[g + 1] += plan.group_offsets[g];
  plan.group_chunks.resize(plan.group_offsets[num_groups]);
  std::vector<int64_t> fill(plan.group_offsets.begin(), plan.group_offsets.end() - 1);
  for (int64_t i = 0; i < static_cast<int64_t>(plan.chunks.size()); ++i) {
    const int64_t g = plan.chunks[i].group;
    if (g >= 0) plan.group_chunks[fill[g]++] = i;
  }
  return plan;
}

}  // namespace fisheradaptune
