// The glue between the op (nag_ops.cpp) and the device runners (nag_cpu.cpp, nag_cuda.cpp): a checked group of
// tensors of one dtype, reduced to raw pointers, and the loop that turns it into filled LaunchTables.
#pragma once

#include <cstdint>
#include <vector>

#include <c10/core/Device.h>

#include "nag_launch.h"
#include "nag_schedule.h"

namespace nag {

// One (device, dtype) group: dense tensors of equal layout, ready for the kernels.
struct Group {
  Dtype dtype = Dtype::kFloat;
  int64_t element_size = 0;
  std::vector<void*> param;
  std::vector<void*> grad;  // written only to unscale them for GradScaler
  std::vector<void*> buf;
  std::vector<int64_t> numel;
  std::vector<uint8_t> first;
};

// Calls launch(table) for each launch of the group's schedule, with `table` filled for that launch.
template <typename Launch>
void for_each_table(const Group& g, LaunchTable& table, Launch&& launch) {
  Segment segs[kMaxSegments];
  plan_launches(g.numel.data(), static_cast<int64_t>(g.numel.size()), kMaxSegments, kMaxBlocks, segs,
                [&](const Segment* s, int64_t count, int64_t /*blocks*/) {
                  for (int64_t i = 0; i < count; ++i) {
                    const int64_t t = s[i].tensor;
                    const int64_t bytes = s[i].offset * g.element_size;
                    table.param[i] = static_cast<char*>(g.param[t]) + bytes;
                    table.grad[i] = static_cast<char*>(g.grad[t]) + bytes;
                    table.buf[i] = static_cast<char*>(g.buf[t]) + bytes;
                    table.numel[i] = s[i].numel;
                    table.first[i] = g.first[t];
                  }
                  fill_block_start(s, count, table.block_start);
                  table.size = static_cast<int32_t>(count);
                  launch(table);
                });
}

// Device runners; each updates every tensor of the group.
void run_cpu(const Group& group, const StepArgs& args);
void run_cuda(const Group& group, const StepArgs& args, c10::Device device);  // only in CUDA builds (NAG_WITH_CUDA)

}  // namespace nag
