// nag_cuda._kernels: the CPU kernels (nag_cpu.cpp) behind a KernelTable (nag_kernels.h), on torch's stable ABI.
#include "kernels_module.h"

namespace nag {
namespace {

const char* run(const GroupView* group, const StepArgs* args, int /*device*/) {
  return catching([&] { run_cpu(*group, *args); });
}

const char* norm(const GroupView* grads, NormKind kind, float p, const float* inv_grad_scale, void* partials,
                 int /*device*/) {
  return catching([&] { norm_cpu(*grads, kind, p, inv_grad_scale, static_cast<double*>(partials)); });
}

const char* compiled_for() { return "cpu"; }

constexpr KernelTable kTable{kKernelAbi, sizeof(KernelTable), sizeof(GroupView), sizeof(StepArgs), run, norm,
                                compiled_for};

}  // namespace
}  // namespace nag

extern "C" PyObject* PyInit__kernels(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_kernels", "nag_cuda's CPU kernels (csrc/nag_kernels.h)", -1,
                            nullptr};
  return nag::module_with_table(&def, &nag::kTable, NAG_TABLE_CAPSULE("nag_cuda._kernels"));
}
