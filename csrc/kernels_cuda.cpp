// nag_cuda._kernels_cuda: the CUDA kernels (nag_cuda.cpp, nag_kernel.cu) behind a KernelTable (nag_kernels.h), on
// torch's stable ABI. A library apart from the CPU one, so that a CPU-only torch never loads it.
#include "kernels_module.h"

namespace nag {
namespace {

const char* run(const GroupView* group, const StepArgs* args, int device) {
  return catching([&] { run_cuda(*group, *args, device); });
}

const char* norm(const GroupView* grads, NormKind kind, float p, const float* inv_grad_scale, void* partials,
                 int device) {
  return catching([&] { norm_cuda(*grads, kind, p, inv_grad_scale, static_cast<float*>(partials), device); });
}

constexpr KernelTable kTable{kKernelAbi, sizeof(KernelTable), sizeof(GroupView), sizeof(StepArgs), run, norm,
                                cuda_arch_list};

}  // namespace
}  // namespace nag

extern "C" PyObject* PyInit__kernels_cuda(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_kernels_cuda", "nag_cuda's CUDA kernels (csrc/nag_kernels.h)",
                            -1, nullptr};
  return nag::module_with_table(&def, &nag::kTable, NAG_TABLE_CAPSULE("nag_cuda._kernels_cuda"));
}
