// The boundary between the torch glue (.cpp) and the CUDA kernel (.cu): plain C++ types only, so that the .cu
// file compiles with nvcc alone, without torch's CUDA headers (CI has only torch's CPU wheel).
#pragma once

#include "nag_schedule.h"

namespace nag {

enum class Dtype { kFloat, kDouble, kHalf, kBFloat16 };

// A step's hyperparameters as the op receives them; each kernel converts them to its math type.
// inv_grad_scale (1 / GradScaler's scale) and found_inf point to float32 scalars on the params' device, or are null:
// the kernels read them there, so a step under GradScaler needs no host synchronisation.
struct StepArgs {
  double lr;
  double momentum;
  double weight_decay;
  bool maximize;
  const float* inv_grad_scale = nullptr;  // grads are unscaled and written back, as GradScaler.unscale_ does
  const float* found_inf = nullptr;       // nonzero: the step changes nothing
  const void* lr_tensor = nullptr;        // when set, the learning rate (and `lr` is not used): a float32
  bool lr_tensor_is_double = false;       // or, when this is true, a float64 scalar on the device
};

// Launches the kernel for one table of `dtype` tensors on `stream` (a cudaStream_t) of the current device.
// Returns nullptr, or the CUDA error message if the launch failed.
const char* cuda_launch(const LaunchTable& table, Dtype dtype, const StepArgs& args, void* stream);

// The GPU architectures the kernel was compiled for, e.g. "800,900" (nvcc's __CUDA_ARCH_LIST__).
const char* cuda_arch_list();

}  // namespace nag
