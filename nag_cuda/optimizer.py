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


# The momentum-buffer dtypes the kernels have for each param dtype; the first is the default (with master weights:
# float32). Complex params keep buffers of their own dtype. Mirrors visit_kind in csrc/nag_launch.h, so that a
# nonsensical option fails at construction rather than at the first step (test_precision checks both agree).
_BUFFER_DTYPES = {
    torch.float32: (torch.float32, torch.bfloat16),
    torch.float64: (torch.float64,),
    torch.float16: (torch.float16, torch.float32),
    torch.bfloat16: (torch.bfloat16, torch.float32),
}
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _buffer_dtype(group: dict, param_dtype: torch.dtype) -> torch.dtype:
    if group["momentum_dtype"] is not None:
        return group["momentum_dtype"]
    return torch.float32 if group["master_weights"] else param_dtype


def _check_precision_options(group: dict) -> None:
    """The low-precision options against the dtypes of the group's params: a clear error before any step."""
    momentum_dtype, master, stochastic = group["momentum_dtype"], group["master_weights"], group["stochastic_rounding"]
    if momentum_dtype is not None and not isinstance(momentum_dtype, torch.dtype):
        raise TypeError(f"momentum_dtype must be a torch.dtype or None, got {momentum_dtype!r}")
    seed = group["sr_seed"]
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"sr_seed must be an int or None, got {seed!r}")
    if master and stochastic:
        raise ValueError("master_weights=True and stochastic_rounding=True exclude each other: with master weights "
                         "the float32 master is updated and the param is its rounding to nearest")
    if stochastic and group["capturable"]:
        raise ValueError("stochastic_rounding=True does not support capturable=True: a captured step would replay "
                         "the same random bits")
    for p in group["params"]:
        if master and p.dtype not in _LOW_PRECISION:
            raise ValueError(f"master_weights=True is for float16 and bfloat16 params; a param has dtype {p.dtype}, "
                             "which is updated at its own precision already")
        if stochastic and p.dtype != torch.bfloat16:
            raise ValueError(f"stochastic_rounding=True is for bfloat16 params; a param has dtype {p.dtype}")
        allowed = (p.dtype,) if p.is_complex() else _BUFFER_DTYPES.get(p.dtype, (p.dtype,))
        if momentum_dtype is not None and momentum_dtype not in allowed:
            raise ValueError(f"momentum_dtype={momentum_dtype} is not supported for a param of dtype {p.dtype}; "
                             f"supported: {', '.join(str(d) for d in allowed)}")


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

# Param-group keys that state dicts of torch's SGD or of older FusedNAG versions lack.
_LATER_DEFAULTS = dict(maximize=False, nesterov=True, dampening=0, capturable=False, momentum_dtype=None,
                       master_weights=False, stochastic_rounding=False, sr_seed=None, sr_step=0)


def _local(p, grad, buf, master):
    """DTensor params (FSDP2, tensor parallel): the kernel updates this rank's shard in place, with no gather; the
    buffer (and master) stays a DTensor in the state, sharded like its param."""
    if DTensor is None or not isinstance(p, DTensor):
        return p, grad, buf, master
    if not isinstance(grad, DTensor) or grad.placements != p.placements:
        raise ValueError(f"FusedNAG: the grad of a DTensor parameter with placements {p.placements} must be a DTensor "
                         f"with the same placements, got {getattr(grad, 'placements', type(grad).__name__)}")
    return tuple(t.to_local() if isinstance(t, DTensor) else t for t in (p, grad, buf, master))


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
        momentum_dtype: dtype of the momentum buffers (default: None, the param's; float32 with master_weights).
            torch.float32 for float16/bfloat16 params, or torch.bfloat16 for float32 params.
        master_weights: for float16/bfloat16 params: keep a float32 copy in ``state[p]["master_param"]``, update
            it, and write its rounding to nearest into the param in the same pass (default: False).
        stochastic_rounding: for bfloat16 params: round each updated param stochastically (unbiased) instead of to
            nearest, so that updates smaller than half a bfloat16 step still count on average (default: False).
        sr_seed: seed of the stochastic rounding (default: None, drawn from torch's default generator, so
            ``torch.manual_seed`` makes runs reproducible). Each step and param group draws different bits.

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

    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0.0, *, maximize=False, capturable=False,
                 momentum_dtype=None, master_weights=False, stochastic_rounding=False, sr_seed=None):
        _check_hyperparameters(lr, momentum, weight_decay)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize, nesterov=True,
                        dampening=0, capturable=capturable, momentum_dtype=momentum_dtype,
                        master_weights=master_weights, stochastic_rounding=stochastic_rounding, sr_seed=sr_seed)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _LATER_DEFAULTS.items():
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict) -> None:
        # Check the group's own values, against its params' dtypes, before it joins the optimizer.
        params = param_group["params"]
        if not isinstance(params, set):  # (torch's own check rejects sets, below)
            param_group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        group = {**self.defaults, **param_group}
        _check_group(group)
        _check_precision_options(group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("sr_step", 0)  # stochastic rounding: steps taken, for the random bits
        if group["stochastic_rounding"] and group["sr_seed"] is None:
            group["sr_seed"] = int(torch.randint(0, 2**62, ()))  # from torch's generator: manual_seed reproduces it

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim.Optimizer.load_state_dict, except that momentum buffers and master weights keep their
        own dtype: torch casts all floating-point state to its param's dtype, which would round a float32 master or
        momentum_dtype buffer of a bfloat16 param to bfloat16."""
        super().load_state_dict(state_dict)
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            for p, i in zip(group["params"], saved["params"], strict=True):
                for key, value in state_dict["state"].get(i, {}).items():
                    if key == "master_param":
                        dtype = torch.float32
                    elif key == "momentum_buffer":
                        dtype = _buffer_dtype(group, p.dtype)
                    else:
                        continue
                    if isinstance(value, torch.Tensor):
                        self.state[p][key] = value.to(device=p.device, dtype=dtype, copy=True)

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
        calls, new_state = [], []
        for index, group in enumerate(self.param_groups):
            _check_group(group, values=False)
            lr = group["lr"]
            tensor_lr = isinstance(lr, torch.Tensor)  # read by the kernel on the device (LR schedulers fill_ it)
            hyper = (float(group["momentum"]), float(group["weight_decay"]), bool(group["maximize"]))
            may_skip = found_inf is not None or group["capturable"]
            modes = {}
            if group["stochastic_rounding"]:  # a different key for every step and group, hashed by the kernels
                modes["sr_seed"] = (group["sr_seed"] + group["sr_step"] * 0x9E3779B97F4A7C15
                                    + index * 0xD1B54A32D192ED03) % 2**63
            for device, lists in self._gather(group, new_state, may_skip).items():
                amp = dict(grad_scale=_on(device, grad_scale), found_inf=_on(device, found_inf))
                if group["master_weights"]:
                    amp["master_params"], lists = lists[4], lists[:4]
                lr_here = _on(device, lr) if tensor_lr else float(lr)
                calls.append((step_function(device, tensor_lr), lists, (lr_here, *hyper), {**amp, **modes}))
        # Nothing changes unless every call will succeed: a bad group, a sparse gradient or a mismatched momentum
        # buffer leaves all parameters and all momentum state as they were. The compiled op checks its arguments
        # before it writes, so the first call checks itself; the others (and the reference) are checked up front.
        for i, (fn, (params, grads, bufs, _), _, kwargs) in enumerate(calls):
            if i > 0 or fn is nag_step_reference:
                ops._check_step(params, grads, bufs, kwargs.get("grad_scale"), kwargs.get("found_inf"),
                                kwargs.get("master_params"), "sr_seed" in kwargs)
        for fn, lists, hyper, kwargs in calls:
            fn(*lists, *hyper, **kwargs)
        # New state becomes state only once the kernel has written it (or, under GradScaler, zeroed: see _gather).
        for p, key, value in new_state:
            self.state[p][key] = value
        for group in self.param_groups:
            if group["stochastic_rounding"]:
                group["sr_step"] += 1
        return loss

    def _gather(self, group: dict, new_state: list, may_skip: bool) -> dict:
        """The kernel's tensor lists for one param group, per device: (params, grads, buffers, is_first), and the
        master weights last when the group has them.

        This loop runs for every parameter at every step, so it only collects; the op checks the tensors.
        may_skip: GradScaler may skip this step on the device, which the host does not know without a sync, or
        the step may be captured in a CUDA graph and replayed. New buffers are then zeros, stepped as not-first:
        momentum * 0 + g is exactly the first step's buffer g, a skipped step leaves valid zeros (torch's fused SGD
        leaves uninitialised memory as state there), and a replayed step is a steady-state step.
        """
        state = self.state
        master_weights = group["master_weights"]
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
                buf = make(p, dtype=_buffer_dtype(group, p.dtype), memory_format=torch.preserve_format)
                new_state.append((p, "momentum_buffer", buf))
            master = None
            if master_weights:
                master = st.get("master_param") if st else None
                if master is None:
                    master = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
                    new_state.append((p, "master_param", master))
            if type(p) not in _PLAIN:
                p, grad, buf, master = _local(p, grad, buf, master)
            lists = by_device.get(p.device)
            if lists is None:
                lists = by_device[p.device] = ([], [], [], [], []) if master_weights else ([], [], [], [])
            lists[0].append(p)
            lists[1].append(grad)
            lists[2].append(buf)
            lists[3].append(first)
            if master_weights:
                lists[4].append(master)
        return by_device
