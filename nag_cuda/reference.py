"""The FusedNAG update in plain PyTorch: the kernels' contract, for tests and for devices with no compiled kernel.

Same arguments as torch.ops.nag_cuda.nag_step_. Math in float32 (float64 for float64 tensors), rounded once when
p and buf are stored, as the kernels do.
"""

import torch


def nag_step_reference(params, grads, momentum_buffers, is_first, lr, momentum, weight_decay, maximize):
    for p, grad, buf, first in zip(params, grads, momentum_buffers, is_first, strict=True):
        if p.is_complex():  # updated as (real, imaginary) pairs, as the kernels do
            p, grad, buf = torch.view_as_real(p), torch.view_as_real(grad), torch.view_as_real(buf)
        math = torch.float64 if p.dtype == torch.float64 else torch.float32
        g = grad.to(math)
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g + weight_decay * p.to(math)
        b = g if first else momentum * buf.to(math) + g
        g = g + momentum * b
        p.copy_(p.to(math) - lr * g)
        buf.copy_(b)
