// Stages "clip", "check" and "run" (nag_cuda/_step.py: clip_calls, check, run). No Python code runs here while the
// GIL is held (see step.h); a large step releases it around its op calls, with every tensor owned first.
#include <array>
#include <cmath>
#include <string>

#include <ATen/ops/maximum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include "nag_ops.h"
#include "step.h"

namespace nag::step {
namespace {

// Steps that update at least this many elements run their op calls without the GIL, as torch's own ops do, so that
// other Python threads run meanwhile; smaller ones keep it, which lets them borrow.
constexpr int64_t kReleaseGilNumel = int64_t{1} << 20;

struct NoGil {
  PyThreadState* saved = PyEval_SaveThread();
  ~NoGil() { PyEval_RestoreThread(saved); }
};

// One op call, through the dispatcher (autograd's checks and version counters included), on `lists` (params, grads,
// buffers, masters).
void call_op(const Call& c, const std::array<at::TensorList, 4>& lists) {
  const std::optional<at::TensorList> masters =
      c.masters.empty() ? std::nullopt : std::optional<at::TensorList>(lists[3]);
  if (c.lr_tensor.has_value()) {
    step_op<const at::Tensor&>().call(lists[0], lists[1], lists[2], c.first, *c.lr_tensor, c.momentum,
                                      c.weight_decay, c.maximize, c.grad_scale, c.found_inf, masters, c.sr_seed,
                                      c.grad_coef);
  } else {
    step_op<double>().call(lists[0], lists[1], lists[2], c.first, c.lr, c.momentum, c.weight_decay, c.maximize,
                           c.grad_scale, c.found_inf, masters, c.sr_seed, c.grad_coef);
  }
}

// The calls in order; after the first has written, a failure says that the step is incomplete (_step.run).
void run_calls(const Plan& plan, const std::vector<std::array<at::TensorList, 4>>& lists, size_t& ran) {
  auto incomplete = [&](size_t i, const char* what) {
    TORCH_CHECK(false, "FusedNAG: op call ", i + 1, " of ", plan.calls.size(), " of this step failed in its kernel, "
                "after the calls before it had updated their params: this step is incomplete. ", what);
  };
  for (ran = 0; ran < plan.calls.size(); ++ran) {
    if (ran == 0) {
      call_op(plan.calls[ran], lists[ran]);
      continue;
    }
    try {
      call_op(plan.calls[ran], lists[ran]);
    } catch (const c10::Error& error) {
      incomplete(ran, error.what_without_backtrace());
    } catch (const std::exception& error) {  // (a Python kernel's, say)
      incomplete(ran, error.what());
    }
  }
}

}  // namespace

at::Tensor clip(Plan& plan, const std::optional<at::Tensor>& grad_scale, double max_norm, double norm_type) {
  at::Tensor total;
  for (const auto& [device, grads] : plan.grads_by_device) {
    at::Tensor part = grad_norm_partial(grads.list(), norm_type, on(grad_scale, device));
    if (!total.defined()) {
      total = part;
      continue;
    }
    part = part.to(total.device(), /*non_blocking=*/true);
    total = std::isinf(norm_type) ? at::maximum(total, part) : total.add(part);
  }
  if (!total.defined()) total = at::zeros({}, at::kFloat);  // no grads: clip_grad_norm_ returns 0 too
  auto [norm, coef] = clip_coef(total, max_norm, norm_type);
  for (Call& c : plan.calls) c.grad_coef = on(coef, c.device);
  return norm;
}

void check(const Plan& plan) {
  // (the first call checks itself, before it writes)
  for (size_t i = 1; i < plan.calls.size(); ++i) {
    const Call& c = plan.calls[i];
    check_step(c.params.list(), c.grads.list(), c.bufs.list(), c.first, c.lr_tensor, c.grad_scale, c.found_inf,
               c.masters.empty() ? std::nullopt : std::optional(c.masters.list()), c.sr_seed.has_value(),
               c.grad_coef);
  }
}

void run(const Plan& plan, size_t& ran) {
  int64_t numel = 0;
  for (const Call& c : plan.calls) numel += c.numel;
  std::vector<std::array<at::TensorList, 4>> lists(plan.calls.size());
  if (numel < kReleaseGilNumel) {
    for (size_t i = 0; i < plan.calls.size(); ++i) {
      const Call& c = plan.calls[i];
      lists[i] = {c.params.list(), c.grads.list(), c.bufs.list(), c.masters.list()};
    }
    run_calls(plan, lists, ran);
    return;
  }
  // Every call's tensors owned, before the GIL is released for the first call: while it is released, other threads
  // may drop what the Python objects held (a grad set to None). Released after the GIL is taken back.
  std::vector<std::array<std::vector<at::Tensor>, 4>> owned(plan.calls.size());
  for (size_t i = 0; i < plan.calls.size(); ++i) {
    const Call& c = plan.calls[i];
    const Borrowed* borrowed[4] = {&c.params, &c.grads, &c.bufs, &c.masters};
    for (int k = 0; k < 4; ++k) {
      owned[i][k].assign(borrowed[k]->list().begin(), borrowed[k]->list().end());
      lists[i][k] = owned[i][k];
    }
  }
  const NoGil no_gil;
  run_calls(plan, lists, ran);
}

}  // namespace nag::step
