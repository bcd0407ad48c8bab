// The CUDA runners (the step, the norm of max_grad_norm): device guard, current stream, one kernel launch per
// LaunchTable, every launch checked.
// It uses only c10/core headers (no c10/cuda), so CI checks it against torch's CPU wheel with -DNAG_WITH_CUDA.
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include "nag_group.h"

namespace nag {

void run_cuda(const Group& group, const StepArgs& args, c10::Device device) {
  const c10::DeviceGuard guard(device);
  void* stream = c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).getStream(device).native_handle();
  LaunchTable table;
  for_each_table(group, args, table, [&](const LaunchTable& t, uint64_t launch_key) {
    const char* err = cuda_launch(t, group.kind, args, launch_key, stream);
    TORCH_CHECK(err == nullptr, "nag_cuda: CUDA kernel launch failed: ", err);
  });
}

void norm_cuda(const Group& grads, NormKind kind, float p, const float* inv_grad_scale, float* partials,
               c10::Device device) {
  const c10::DeviceGuard guard(device);
  void* stream = c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).getStream(device).native_handle();
  const StepArgs no_args{};
  LaunchTable table;
  for_each_table(grads, no_args, table, [&](const LaunchTable& t, uint64_t) {
    const char* err = cuda_norm_launch(t, grads.kind.param, kind, p, inv_grad_scale, partials, stream);
    TORCH_CHECK(err == nullptr, "nag_cuda: CUDA kernel launch failed: ", err);
    partials += t.block_start[t.size];
  });
}

}  // namespace nag
