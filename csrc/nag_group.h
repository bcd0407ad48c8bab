// The glue between the op (nag_ops.cpp) and the kernels' libraries (nag_kernels.h): a checked group of tensors of
// one dtype, reduced to raw pointers, and the loop that turns it into filled LaunchTables. Nothing from torch here:
// both sides include it.
#pragma once

#include <cstdint>
#include <vector>

#include "nag_kernels.h"
#include "nag_launch.h"
#include "nag_schedule.h"

namespace nag {

// One (device, kind) group: dense tensors of equal layout, ready for the kernels. The norm of max_grad_norm takes a
// group of grads alone (param, buf, master and first empty; kind.param their dtype).
struct Group {
  Kind kind{Dtype::kFloat, Dtype::kFloat, Mode::kPlain};
  int64_t param_size = 0;  // bytes per element of params (and grads) and of buffers
  int64_t buf_size = 0;
  std::vector<void*> param;
  std::vector<void*> grad;    // written only to unscale them for GradScaler
  std::vector<void*> buf;
  std::vector<void*> master;  // Mode::kMaster: float32 master weights, else empty
  std::vector<int64_t> numel;
  std::vector<uint8_t> first;

  void reserve(size_t n, bool masters) {
    for (std::vector<void*>* v : {&param, &grad, &buf}) v->reserve(n);
    if (masters) master.reserve(n);
    numel.reserve(n);
    first.reserve(n);
  }

  // (the empty vectors as null pointers)
  GroupView view() const {
    auto ptr = [](const auto& v) { return v.empty() ? nullptr : v.data(); };
    return GroupView{kind, param_size, buf_size, static_cast<int64_t>(numel.size()), ptr(param), ptr(grad),
                     ptr(buf), ptr(master), ptr(numel), ptr(first)};
  }
};

// Calls launch(table, launch_key) for each launch of the group's schedule, with `table` filled for that launch.
// launch_key: the random bits' key of the launch, from the step's seed, the group's kind and the launch's index.
template <typename Launch>
void for_each_table(const GroupView& g, const StepArgs& args, LaunchTable& table, Launch&& launch) {
  Segment segs[kMaxSegments];
  const uint64_t kind_key = derive_key(args.sr_seed, static_cast<int64_t>(g.kind.param) * 4 +
                                                         static_cast<int64_t>(g.kind.buf));
  int64_t launch_index = 0;
  plan_launches(g.numel, g.size, kMaxSegments, kMaxBlocks, segs,
                [&](const Segment* s, int64_t count, int64_t /*blocks*/) {
                  for (int64_t i = 0; i < count; ++i) {
                    const int64_t t = s[i].tensor;
                    const int64_t offset = s[i].offset;
                    table.param[i] =
                        g.param == nullptr ? nullptr : static_cast<char*>(g.param[t]) + offset * g.param_size;
                    table.grad[i] = static_cast<char*>(g.grad[t]) + offset * g.param_size;
                    table.buf[i] = g.buf == nullptr ? nullptr : static_cast<char*>(g.buf[t]) + offset * g.buf_size;
                    table.master[i] = g.master == nullptr ? nullptr : static_cast<float*>(g.master[t]) + offset;
                    table.numel[i] = s[i].numel;
                    table.first[i] = g.first == nullptr ? 0 : g.first[t];
                  }
                  fill_block_start(s, count, table.block_start);
                  table.size = static_cast<int32_t>(count);
                  launch(table, derive_key(kind_key, launch_index++));
                });
}

}  // namespace nag
