// The boundary between the torch glue (.cpp) and the CUDA kernel (.cu): plain C++ types only, so that the .cu
// file compiles with nvcc alone, without torch's CUDA headers (CI has only torch's CPU wheel).
#pragma once

#include <stdint.h>

#include "nag_schedule.h"

namespace nag {

enum class Dtype : int32_t { kFloat, kDouble, kHalf, kBFloat16 };

// How the param is stored: updated in place (kPlain); written as the rounding of a float32 master copy, which is
// what is read and updated (kMaster); or updated in place with stochastic rounding, bfloat16 only (kStochastic).
enum class Mode : int32_t { kPlain, kMaster, kStochastic };

// What one launch's kernel is compiled for: the dtype of the params (and grads), of the momentum buffers, the mode.
struct Kind {
  Dtype param;
  Dtype buf;
  Mode mode;
};

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
  uint64_t sr_seed = 0;                   // Mode::kStochastic: a new value each step (see derive_key)
  const float* grad_coef = nullptr;       // clipping: grads are multiplied by it as read (see clip); NaN: skip
  bool fused_multiply_add = true;         // CPU: whether torch's CPU kernels fuse (see mul_add in nag_math.h)
};

// The kinds the kernels are compiled for, listed once for both: calls f(Type<P>, Type<B>, ModeTag<mode>) with
// the element types of the matching kind (each kernel passes its own types for the four dtypes) and returns true,
// or returns false if `kind` is not supported.
template <typename T> struct Type { using type = T; };
template <Mode m> struct ModeTag { static constexpr Mode value = m; };

template <typename F32, typename F64, typename F16, typename BF16, typename F>
bool visit_kind(const Kind& kind, F&& f) {
#define NAG_KIND(MODE, P, TP, B, TB)                                                   \
  if (kind.mode == Mode::MODE && kind.param == Dtype::P && kind.buf == Dtype::B) {     \
    f(Type<TP>{}, Type<TB>{}, ModeTag<Mode::MODE>{});                                  \
    return true;                                                                       \
  }
  NAG_KIND(kPlain, kFloat, F32, kFloat, F32)
  NAG_KIND(kPlain, kDouble, F64, kDouble, F64)
  NAG_KIND(kPlain, kHalf, F16, kHalf, F16)
  NAG_KIND(kPlain, kBFloat16, BF16, kBFloat16, BF16)
  NAG_KIND(kPlain, kFloat, F32, kBFloat16, BF16)   // momentum_dtype=torch.bfloat16
  NAG_KIND(kPlain, kHalf, F16, kFloat, F32)        // momentum_dtype=torch.float32
  NAG_KIND(kPlain, kBFloat16, BF16, kFloat, F32)
  NAG_KIND(kMaster, kHalf, F16, kHalf, F16)        // master_weights=True
  NAG_KIND(kMaster, kHalf, F16, kFloat, F32)
  NAG_KIND(kMaster, kBFloat16, BF16, kBFloat16, BF16)
  NAG_KIND(kMaster, kBFloat16, BF16, kFloat, F32)
  NAG_KIND(kStochastic, kBFloat16, BF16, kBFloat16, BF16)  // stochastic_rounding=True
  NAG_KIND(kStochastic, kBFloat16, BF16, kFloat, F32)
#undef NAG_KIND
  return false;
}

// Calls f(NormTag<kind>{}): a norm kind (nag_math.h) as a compile-time value, for the kernels' templates.
template <NormKind k> struct NormTag { static constexpr NormKind value = k; };

template <typename F>
void visit_norm(NormKind kind, F&& f) {
  switch (kind) {
    case NormKind::kTwo: return f(NormTag<NormKind::kTwo>{});
    case NormKind::kOne: return f(NormTag<NormKind::kOne>{});
    case NormKind::kInf: return f(NormTag<NormKind::kInf>{});
    case NormKind::kOther: return f(NormTag<NormKind::kOther>{});
  }
}

// Launches the kernel for one table on `stream` (a cudaStream_t) of the current device. launch_key: the random
// bits' key of this launch (Mode::kStochastic). Returns nullptr, or the CUDA error message if the launch failed.
const char* cuda_launch(const LaunchTable& table, const Kind& kind, const StepArgs& args, uint64_t launch_key,
                        void* stream);

// The norm's partial results of one table's grads (of element type `grad`), one per block, into partials[0, blocks):
// sums of |g * inv_grad_scale|^p, or their largest |g * inv_grad_scale| (see norm_term). inv_grad_scale: a float32 on
// the device, or null. Returns nullptr, or the CUDA error message if the launch failed.
const char* cuda_norm_launch(const LaunchTable& table, Dtype grad, NormKind kind, float p,
                             const float* inv_grad_scale, float* partials, void* stream);

// The GPU architectures the kernel was compiled for, e.g. "800,900" (nvcc's __CUDA_ARCH_LIST__).
const char* cuda_arch_list();

}  // namespace nag
