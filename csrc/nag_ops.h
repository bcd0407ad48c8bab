// What nag_ops.cpp offers the rest of the extension besides the registered ops.
#pragma once

#include <optional>
#include <type_traits>

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "nag_launch.h"

namespace nag {

// The checks of a whole call of nag_step_ (lengths, lr, GradScaler's tensors); returns the mode of its kernels.
Mode check_call(at::TensorList params, at::TensorList grads, at::TensorList bufs, const c10::List<bool>& is_first,
                const std::optional<at::Tensor>& lr, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, const std::optional<at::TensorList>& master_params,
                bool stochastic);

// The (param dtype, buffer dtype) pair last found to have a kernel, which lets the next param skip the lookup.
struct KindMemo {
  at::ScalarType param = at::ScalarType::Undefined;
  at::ScalarType buf = at::ScalarType::Undefined;
};

// The checks of params[i] with its grad, buffer and master (or null), on `device`: returns the kind of kernel that
// updates it. unscale: the grad is written too (GradScaler).
Kind check_tensors(const at::Tensor& p, const at::Tensor& grad, const at::Tensor& buf, const at::Tensor* master,
                   size_t i, bool unscale, Mode mode, c10::Device device, KindMemo& memo);

// Checks everything nag_cuda::nag_step_ checks before it writes (lr: the tensor learning rate, or none), so that a
// caller with several calls can check them all before the first one runs.
void check_step(at::TensorList params, at::TensorList grads, at::TensorList bufs, const c10::List<bool>& is_first,
                const std::optional<at::Tensor>& lr, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, const std::optional<at::TensorList>& master_params,
                bool stochastic);

// The op nag_cuda::nag_step_ as a C++ function type; its two overloads differ only in lr: double (the default) or
// const at::Tensor& (.tensor_lr).
template <typename Lr>
using StepSignature = void(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                           const c10::List<bool>& is_first, Lr lr, double momentum, double weight_decay,
                           bool maximize, const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf,
                           const std::optional<at::TensorList>& master_params, std::optional<int64_t> sr_seed);

// The overload's handle, for calls through the dispatcher from C++.
template <typename Lr>
const c10::TypedOperatorHandle<StepSignature<Lr>>& step_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("nag_cuda::nag_step_", std::is_same_v<Lr, double> ? "" : "tensor_lr")
                             .template typed<StepSignature<Lr>>();
  return op;
}

}  // namespace nag
