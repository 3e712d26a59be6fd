#include "common/validate.h"

#include <algorithm>

namespace fisheradaptune {

std::vector<Segment> read_segments(const char* op, const char* arg, const Tensor& segments,
                                   const std::vector<int64_t>& numels, int64_t num_groups) {
  FAT_CHECK_VALUE(segments.scalar_type() == ScalarType::Long, op, arg, "expected int64, got ",
                 segments.scalar_type());
  FAT_CHECK_VALUE(segments.dim() == 2 && segments.size(1) == 4, op, arg,
                  "expected shape [S, 4] (tensor_index, begin, end, group_id), got ",
                  segments.sizes());
  // Note [Segments on the host] (plan.h): CPU read in place; CUDA copied (synchronises).
  FAT_CHECK_VALUE(segments.is_cpu() || segments.is_cuda(), op, arg,
                  "expected a CPU tensor (kernels plan on the host; GroupLayout.segments is the ",
                  "CPU copy), got one on ", segments.device());
  const Tensor host = as_contiguous(segments.is_cpu() ? segments : st::to(segments, cpu_device()));
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

}  // namespace fisheradaptune
