"""The FusedNAG update in plain PyTorch: the kernels' contract, for tests and for devices with no compiled kernel.

Same arguments as torch.ops.nag_cuda.nag_step_. Math in float32 (float64 for float64 tensors) with torch's roundings
(see csrc/nag_math.h), rounded to the tensor dtype once when p and buf are stored, as the kernels do.
Stochastic rounding draws its random bits from torch's generator seeded with sr_seed, so it is unbiased like the
kernels' but not bit-identical to them.
"""

import torch


def stochastic_round_to_bfloat16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 -> bfloat16, rounding up with probability equal to the distance from the value below (unbiased)."""
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int32).to(x.device)
    bits = (x.view(torch.int32) + noise) & -65536  # add 16 random low bits, then truncate them
    return torch.where(x.isfinite(), bits.view(torch.float32), x).to(torch.bfloat16)


def nag_step_reference(params, grads, momentum_buffers, is_first, lr, momentum, weight_decay, maximize, *,
                       grad_scale=None, found_inf=None, master_params=None, sr_seed=None, grad_coef=None):
    if found_inf is not None and found_inf.item() != 0:  # a host sync, acceptable in this fallback
        return
    if grad_coef is not None and grad_coef.isnan().item():  # a non-finite grad norm (max_grad_norm)
        return
    if isinstance(lr, torch.Tensor):  # the .tensor_lr overload: any real dtype, any 1-element shape
        lr = lr.item()
    inv_scale = grad_scale.reciprocal() if grad_scale is not None else None
    generator = torch.Generator().manual_seed(sr_seed) if sr_seed is not None else None
    masters = master_params if master_params is not None else [None] * len(params)
    for p, grad, buf, master, first in zip(params, grads, momentum_buffers, masters, is_first, strict=True):
        if p.is_complex():  # updated as (real, imaginary) pairs, as the kernels do
            p, grad, buf = torch.view_as_real(p), torch.view_as_real(grad), torch.view_as_real(buf)
        math = torch.float64 if p.dtype == torch.float64 else torch.float32
        if inv_scale is not None:  # as torch.amp.GradScaler.unscale_ does: in float, rounded to the grad's dtype
            grad.copy_(grad.to(math) * inv_scale)
        g = grad.to(math)
        if grad_coef is not None:  # as clip_grad_norm_'s grad.mul_(coef) would leave the grad, without writing it
            g = (g * grad_coef.to(math)).to(grad.dtype).to(math)
        if maximize:
            g = -g
        p_math = master if master is not None else p.to(math)
        # The roundings of torch's per-tensor SGD: add(..., alpha=x) is one fused multiply-add.
        if weight_decay != 0:
            g = g.add(p_math, alpha=weight_decay)
        b = g if first else buf.to(math).mul(momentum).add(g)
        g = g.add(b, alpha=momentum)
        p_new = p_math.add(g, alpha=-lr)
        if master is not None:
            master.copy_(p_new)
        p.copy_(stochastic_round_to_bfloat16(p_new, generator) if generator is not None else p_new)
        buf.copy_(b)


def grad_norm_partial_reference(grads, norm_type, *, grad_scale=None):
    """torch.ops.nag_cuda.grad_norm_partial in plain PyTorch: sum of |g / grad_scale|^p over every element of
    `grads` (one device), or the largest |g / grad_scale| for p = inf, as a float32 0-dim tensor."""
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for grad in grads:
        if grad.numel() == 0:
            continue
        x = (grad.abs() if grad.is_complex() else grad).float()
        if grad_scale is not None:
            x = x * grad_scale.reciprocal()
        if norm_type == float("inf"):
            total = torch.maximum(total, x.abs().amax())
        else:
            total = total + x.abs().pow(norm_type).sum()
    return total
