"""FusedNAG: torch.optim.SGD(nesterov=True, dampening=0) with one fused kernel launch per (device, dtype)."""

from numbers import Real

import torch
from torch.optim import Optimizer

from ._ops import ops, step_function
from .reference import nag_step_reference

__all__ = ["FusedNAG"]


def _check_hyperparameters(lr, momentum, weight_decay, values: bool = True) -> None:
    """values=False (at every step): types only, plus the values of plain numbers; a tensor's value is checked
    once, when its group is added, since reading a CUDA tensor on the host would synchronise every step."""
    hyper = (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay))
    for name, value in hyper:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        elif not isinstance(value, Real):
            raise TypeError(f"{name} must be a real number or a 1-element tensor, got {type(value).__name__}")
    lr, momentum, weight_decay = (None if isinstance(v, torch.Tensor) and not values else v for _, v in hyper)
    if lr is not None and lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if momentum is not None and momentum <= 0.0:
        raise ValueError(f"Invalid momentum value: {momentum} (Nesterov momentum requires momentum > 0)")
    if weight_decay is not None and weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _check_group(group: dict, values: bool = True) -> None:
    _check_hyperparameters(group["lr"], group["momentum"], group["weight_decay"], values)
    if not group.get("nesterov", True) or group.get("dampening", 0) != 0:
        raise ValueError(
            "FusedNAG implements SGD with nesterov=True and dampening=0 only; this param group has "
            f"nesterov={group.get('nesterov')}, dampening={group.get('dampening')}"
        )
    if group.get("capturable") and any(isinstance(group[k], torch.Tensor) for k in ("momentum", "weight_decay")):
        raise ValueError("capturable=True needs momentum and weight_decay as numbers (only lr may be a tensor)")


try:  # torch.distributed is optional in torch builds
    from torch.distributed.tensor import DTensor
except ImportError:
    DTensor = None

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _local(p, grad, buf):
    """DTensor params (FSDP2, tensor parallel): the kernel updates this rank's shard in place, with no gather; the
    buffer stays a DTensor in the state, sharded like its param."""
    if DTensor is None or not isinstance(p, DTensor):
        return p, grad, buf
    if not isinstance(grad, DTensor) or grad.placements != p.placements:
        raise ValueError(f"FusedNAG: the grad of a DTensor parameter with placements {p.placements} must be a DTensor "
                         f"with the same placements, got {getattr(grad, 'placements', type(grad).__name__)}")
    return p.to_local(), grad.to_local(), buf.to_local() if isinstance(buf, DTensor) else buf


def _on(device, t):
    """A scalar tensor (lr, GradScaler's) on the device of the params it applies to (a no-op where it already is)."""
    return None if t is None else t.to(device, non_blocking=True)


class FusedNAG(Optimizer):
    r"""SGD with Nesterov momentum, fused into one kernel launch per (device, dtype) of each param group.

    A drop-in for ``torch.optim.SGD(params, lr, momentum, dampening=0, weight_decay, nesterov=True, maximize)``:
    the same update, the same ``state[p]["momentum_buffer"]`` and the same param-group keys, so state dicts load
    in either direction. Per element (float32 and float64 results are bit-identical to torch's; float16/bfloat16
    are computed in float32 and rounded once)::

        g = -grad if maximize else grad
        g = g + weight_decay * p
        buf = g on p's first step, else momentum * buf + g
        p = p - lr * (g + momentum * buf)

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (default: 1e-3); a float or a 1-element tensor. A tensor on the params' device is read by
            the kernel there (no host synchronisation), and LR schedulers update it in place.
        momentum: momentum factor, > 0 (default: 0.9).
        weight_decay: L2 penalty (default: 0).
        maximize: maximize the objective instead of minimizing it (default: False).
        capturable: the step may be captured in a CUDA graph (default: False). New momentum buffers then start as
            zeros rather than with a first-step special case, which gives the same numbers; use a tensor lr for a
            schedule that changes between replays.

    Example:
        >>> opt = FusedNAG(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        >>> loss_fn(model(x), y).backward()
        >>> opt.step()
        >>> opt.zero_grad()
    """

    # torch.amp.GradScaler.step() then calls step() directly, with `grad_scale` and `found_inf` set as attributes:
    # the kernel unscales the grads (writing them back unscaled, as torch's own unscale_ and fused SGD do) and
    # skips the whole step if found_inf is nonzero, all on the device, with no host synchronisation.
    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0.0, *, maximize=False, capturable=False):
        _check_hyperparameters(lr, momentum, weight_decay)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize, nesterov=True,
                        dampening=0, capturable=capturable)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("nesterov", True)
            group.setdefault("dampening", 0)
            group.setdefault("capturable", False)

    def add_param_group(self, param_group: dict) -> None:
        # Check the group's own values before it joins the optimizer.
        _check_group({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Set by torch.amp.GradScaler.step() (see _step_supports_amp_scaling): None outside of it.
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        calls, new_buffers = [], []
        for group in self.param_groups:
            _check_group(group, values=False)
            lr = group["lr"]
            tensor_lr = isinstance(lr, torch.Tensor)  # read by the kernel on the device (LR schedulers fill_ it)
            hyper = (float(group["momentum"]), float(group["weight_decay"]), bool(group["maximize"]))
            may_skip = found_inf is not None or group["capturable"]
            for device, lists in self._gather(group, new_buffers, may_skip).items():
                amp = dict(grad_scale=_on(device, grad_scale), found_inf=_on(device, found_inf))
                lr_here = _on(device, lr) if tensor_lr else float(lr)
                calls.append((step_function(device, tensor_lr), lists, (lr_here, *hyper), amp))
        # Nothing changes unless every call will succeed: a bad group, a sparse gradient or a mismatched momentum
        # buffer leaves all parameters and all momentum state as they were. The compiled op checks its arguments
        # before it writes, so the first call checks itself; the others (and the reference) are checked up front.
        for i, (fn, (params, grads, bufs, _), _, amp) in enumerate(calls):
            if i > 0 or fn is nag_step_reference:
                ops._check_step(params, grads, bufs, **amp)
        for fn, lists, hyper, amp in calls:
            fn(*lists, *hyper, **amp)
        # A new buffer becomes state only once the kernel has written it (or, under GradScaler, zeroed: see _gather).
        for p, buf in new_buffers:
            self.state[p]["momentum_buffer"] = buf
        return loss

    def _gather(self, group: dict, new_buffers: list, may_skip: bool) -> dict:
        """The kernel's tensor lists for one param group, per device: (params, grads, buffers, is_first).

        This loop runs for every parameter at every step, so it only collects; the op checks the tensors.
        may_skip: GradScaler may skip this step on the device, which the host does not know without a sync, or
        the step may be captured in a CUDA graph and replayed. New buffers are then zeros, stepped as not-first:
        momentum * 0 + g is exactly the first step's buffer g, a skipped step leaves valid zeros (torch's fused SGD
        leaves uninitialised memory as state there), and a replayed step is a steady-state step.
        """
        state = self.state
        by_device = {}
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            st = state.get(p)
            buf = st.get("momentum_buffer") if st else None
            first = buf is None and not may_skip
            if buf is None:
                make = torch.zeros_like if may_skip else torch.empty_like
                buf = make(p, memory_format=torch.preserve_format)
                new_buffers.append((p, buf))
            if type(p) not in _PLAIN:
                p, grad, buf = _local(p, grad, buf)
            lists = by_device.get(p.device)
            if lists is None:
                lists = by_device[p.device] = ([], [], [], [])
            lists[0].append(p)
            lists[1].append(grad)
            lists[2].append(buf)
            lists[3].append(first)
        return by_device
