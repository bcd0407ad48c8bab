// The boundary between the kernels' libraries and the module that calls them.
//
// The kernels (nag_cpu.cpp; nag_cuda.cpp with nag_kernel.cu) are built into their own libraries,
// nag_cuda._kernels (CPU) and nag_cuda._kernels_cuda, on torch's stable ABI: one build of them works with every
// torch from 2.11 on. Each exports a KernelTable of plain functions in a capsule (NAG_TABLE_CAPSULE), read by the
// module tied to one torch (nag_cuda._C) when it loads. Only plain types cross: raw pointers and counts in, an error
// message out; no exception and no torch or C++ library type, so the two sides need not come from one compiler.
#pragma once

#include <stdint.h>

#include "nag_launch.h"

namespace nag {

// One group of tensors of one kind, as raw pointers: `size` entries in each array (master: null unless
// Mode::kMaster; first: 1 where it is the param's first step, its buffer written, never read).
struct GroupView {
  Kind kind;
  int64_t param_size;  // bytes per element of params (and grads) and of buffers
  int64_t buf_size;
  int64_t size;
  void* const* param;
  void* const* grad;  // written only to unscale them for GradScaler
  void* const* buf;
  void* const* master;
  const int64_t* numel;
  const uint8_t* first;
};

// Bumped whenever KernelTable, GroupView, StepArgs or the meaning of a field changes: a library with another
// value, or other sizes of those structs (a change that missed the bump), is refused when the module loads it.
constexpr uint32_t kKernelAbi = 1;

struct KernelTable {
  uint32_t abi;  // kKernelAbi
  uint32_t table_size, view_size, args_size;  // sizeof KernelTable, GroupView, StepArgs
  // Updates every tensor of the group. device: the CUDA device index (the CUDA library; the CPU one ignores it).
  // Returns nullptr, or what failed.
  const char* (*run)(const GroupView* group, const StepArgs* args, int device);
  // The norm's partial results of a group of grads, one per block of its schedule, in block order into `partials`
  // (room for every block; double on CPU, float32 on the CUDA device: see cuda_norm_launch in nag_launch.h).
  const char* (*norm)(const GroupView* grads, NormKind kind, float p, const float* inv_grad_scale, void* partials,
                      int device);
  // What the library was compiled for: "cpu", or the GPU architectures, e.g. "800,900".
  const char* (*compiled_for)();
};

// Inside the kernels' libraries: the runners behind the tables (they throw; the tables' functions catch).
void run_cpu(const GroupView& group, const StepArgs& args);
void norm_cpu(const GroupView& grads, NormKind kind, float p, const float* inv_grad_scale, double* partials);
void run_cuda(const GroupView& group, const StepArgs& args, int device);
void norm_cuda(const GroupView& grads, NormKind kind, float p, const float* inv_grad_scale, float* partials,
               int device);

// The capsule's name: the library's module name and ".table", as PyCapsule_Import expects it.
#define NAG_TABLE_CAPSULE(module) module ".table"

}  // namespace nag
