// What nag_ops.cpp offers the rest of the extension besides the registered ops.
#pragma once

#include <optional>
#include <tuple>
#include <type_traits>

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "nag_kernels.h"

namespace nag {

// The kernels' tables (nag_kernels.h) that the ops run: the CPU library's, and the CUDA library's or null (a CPU
// build). Set once, when nag_cuda._C loads (step.cpp).
void set_kernels(const KernelTable* cpu, const KernelTable* cuda);

// Checks everything nag_cuda::nag_step_ checks before it writes (lr: the tensor learning rate, or none), so that a
// caller with several calls can check them all before the first one runs.
void check_step(at::TensorList params, at::TensorList grads, at::TensorList bufs, const c10::List<bool>& is_first,
                const std::optional<at::Tensor>& lr, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, const std::optional<at::TensorList>& master_params,
                bool stochastic, const std::optional<at::Tensor>& grad_coef);

// max_grad_norm (the ops nag_cuda::grad_norm_partial and nag_cuda::clip_coef): the partial result of one device's
// grads, and from the sum (max) of those the norm and the clip coefficient (NaN where the norm is not finite).
at::Tensor grad_norm_partial(at::TensorList grads, double norm_type, const std::optional<at::Tensor>& grad_scale);
std::tuple<at::Tensor, at::Tensor> clip_coef(const at::Tensor& partial, double max_norm, double norm_type);

// The op nag_cuda::nag_step_ as a C++ function type; its two overloads differ only in lr: double (the default) or
// const at::Tensor& (.tensor_lr).
template <typename Lr>
using StepSignature = void(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                           const c10::List<bool>& is_first, Lr lr, double momentum, double weight_decay,
                           bool maximize, const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf,
                           const std::optional<at::TensorList>& master_params, std::optional<int64_t> sr_seed,
                           const std::optional<at::Tensor>& grad_coef);

// The overload's handle, for calls through the dispatcher from C++.
template <typename Lr>
const c10::TypedOperatorHandle<StepSignature<Lr>>& step_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("nag_cuda::nag_step_", std::is_same_v<Lr, double> ? "" : "tensor_lr")
                             .template typed<StepSignature<Lr>>();
  return op;
}

}  // namespace nag
