#include "common/plan.h"

#include <algorithm>
#include <stdexcept>

namespace fisheradaptune {

Plan make_plan(const std::vector<Segment>& segments, const std::vector<int64_t>& numels,
               int64_t num_groups, int64_t chunk_size, bool cover_gaps) {
  if (chunk_size <= 0) throw std::logic_error("fisheradaptune internal error: make_plan: chunk_size <= 0");
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
