"""The FusedNAG update in plain PyTorch: the kernels' contract, for tests and for devices with no compiled kernel.

Same arguments as torch.ops.nag_cuda.nag_step_. Math in float32 (float64 for float64 tensors) with torch's roundings
(see csrc/nag_math.h), rounded to the tensor dtype once when p and buf are stored, as the kernels do.
"""

import torch


def nag_step_reference(params, grads, momentum_buffers, is_first, lr, momentum, weight_decay, maximize, *,
                       grad_scale=None, found_inf=None):
    if found_inf is not None and found_inf.item() != 0:  # a host sync, acceptable in this fallback
        return
    inv_scale = grad_scale.reciprocal() if grad_scale is not None else None
    for p, grad, buf, first in zip(params, grads, momentum_buffers, is_first, strict=True):
        if inv_scale is not None:
            grad.mul_(inv_scale)  # as torch.amp.GradScaler.unscale_ does
        if p.is_complex():  # updated as (real, imaginary) pairs, as the kernels do
            p, grad, buf = torch.view_as_real(p), torch.view_as_real(grad), torch.view_as_real(buf)
        math = torch.float64 if p.dtype == torch.float64 else torch.float32
        g = grad.to(math)
        if maximize:
            g = -g
        # The roundings of torch's per-tensor SGD: add(..., alpha=x) is one fused multiply-add.
        if weight_decay != 0:
            g = g.add(p.to(math), alpha=weight_decay)
        b = g if first else buf.to(math).mul(momentum).add(g)
        g = g.add(b, alpha=momentum)
        p.copy_(p.to(math).add(g, alpha=-lr))
        buf.copy_(b)
