// The CUDA runners (the step, the norm of max_grad_norm): device guard, current stream, one kernel launch per
// LaunchTable, every launch checked. Built into nag_cuda._kernels_cuda on torch's stable ABI (nag_kernels.h).
// Compiled without the CUDA toolkit's headers (the stream is a void*), so CI checks it against torch's CPU wheel too.
#include <stdexcept>
#include <string>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>  // (with USE_CUDA: the CUDA device guard and current stream)

#include "nag_group.h"

namespace nag {
namespace {

// Makes `device` the current CUDA device for the guard's lifetime, as c10::cuda::CUDAGuard does.
class CudaGuard {
 public:
  explicit CudaGuard(int device) {
    if (aoti_torch_create_cuda_guard(device, &guard_) != AOTI_TORCH_SUCCESS) {
      throw std::runtime_error("nag_cuda: cannot make CUDA device " + std::to_string(device) + " current");
    }
  }
  CudaGuard(const CudaGuard&) = delete;
  CudaGuard& operator=(const CudaGuard&) = delete;
  ~CudaGuard() { aoti_torch_delete_cuda_guard(guard_); }

 private:
  CUDAGuardHandle guard_ = nullptr;
};

void* current_stream(int device) {
  void* stream = nullptr;
  if (aoti_torch_get_current_cuda_stream(device, &stream) != AOTI_TORCH_SUCCESS) {
    throw std::runtime_error("nag_cuda: cannot get the current CUDA stream of device " + std::to_string(device));
  }
  return stream;
}

void check_launch(const char* err) {
  if (err != nullptr) throw std::runtime_error(std::string("nag_cuda: CUDA kernel launch failed: ") + err);
}

}  // namespace

void run_cuda(const GroupView& group, const StepArgs& args, int device) {
  const CudaGuard guard(device);
  void* stream = current_stream(device);
  LaunchTable table;
  for_each_table(group, args, table, [&](const LaunchTable& t, uint64_t launch_key) {
    check_launch(cuda_launch(t, group.kind, args, launch_key, stream));
  });
}

void norm_cuda(const GroupView& grads, NormKind kind, float p, const float* inv_grad_scale, float* partials,
               int device) {
  const CudaGuard guard(device);
  void* stream = current_stream(device);
  const StepArgs no_args{};
  LaunchTable table;
  for_each_table(grads, no_args, table, [&](const LaunchTable& t, uint64_t) {
    check_launch(cuda_norm_launch(t, grads.kind.param, kind, p, inv_grad_scale, partials, stream));
    partials += t.block_start[t.size];
  });
}

}  // namespace nag
