"""What FusedNAG accepts: hyperparameters, param-group values, precision options, clipping settings, and the momentum
buffer dtype each param gets. One list for both step paths: the Python step (_step.py) checks with these functions;
the C++ step (csrc/step_read_groups.cpp) takes only values these accept and answers "not mine" for anything else, so
that the Python step raises the error."""

from numbers import Real

import torch

# The momentum-buffer dtypes the kernels have for each param dtype; the first is the default (with master weights:
# float32). Complex params keep buffers of their own dtype. test_precision checks this against the compiled kernel
# kinds (visit_kind in csrc/nag_launch.h), so that a nonsensical option fails at construction, not at a step.
BUFFER_DTYPES = {
    torch.float32: (torch.float32, torch.bfloat16),
    torch.float64: (torch.float64,),
    torch.float16: (torch.float16, torch.float32),
    torch.bfloat16: (torch.bfloat16, torch.float32),
}
LOW_PRECISION = (torch.float16, torch.bfloat16)

# Param-group keys that state dicts of torch's SGD or of older FusedNAG versions lack.
LATER_DEFAULTS = dict(maximize=False, nesterov=True, dampening=0, foreach=None, differentiable=False, fused=None,
                      capturable=False, momentum_dtype=None, master_weights=False, stochastic_rounding=False,
                      sr_seed=None, sr_step=0)


def buffer_dtype(group: dict, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a new momentum buffer (csrc/step_gather.cpp: the same rule)."""
    if group["momentum_dtype"] is not None:
        return group["momentum_dtype"]
    return torch.float32 if group["master_weights"] else param_dtype


def check_hyperparameters(lr, momentum, weight_decay, values: bool = True) -> None:
    """values=False (at every step): types only, plus the values of plain numbers; a tensor's value is checked
    once, when its group is added, since reading a CUDA tensor on the host would synchronise every step."""
    hyper = (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay))
    for name, value in hyper:
        if type(value) is float or type(value) is int:  # the common case, without the slower ABC check below
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.is_complex():
                raise ValueError(f"Tensor {name} must be 1-element and real, got {value.dtype} of shape "
                                 f"{tuple(value.shape)}")
        elif not isinstance(value, Real) and not hasattr(type(value), "__float__"):  # numpy's 0-d arrays have it
            raise TypeError(f"{name} must be a real number or a 1-element tensor, got {type(value).__name__}")

    def comparable(value):  # (a number as float() makes it, which is what the step uses)
        if isinstance(value, torch.Tensor):
            return value if values else None
        return value if type(value) is float or type(value) is int else float(value)

    lr, momentum, weight_decay = (comparable(value) for _, value in hyper)
    if lr is not None and lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if momentum is not None and momentum <= 0.0:
        raise ValueError(f"Invalid momentum value: {momentum} (Nesterov momentum requires momentum > 0)")
    if weight_decay is not None and weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def check_modes(group: dict) -> None:
    """The precision options that do not depend on the params (checked at every step too: they may be set later)."""
    momentum_dtype, master, stochastic = group["momentum_dtype"], group["master_weights"], group["stochastic_rounding"]
    if momentum_dtype is not None and not isinstance(momentum_dtype, torch.dtype):
        raise TypeError(f"momentum_dtype must be a torch.dtype or None, got {momentum_dtype!r}")
    seed = group.get("sr_seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"sr_seed must be an int or None, got {seed!r}")
    if master and stochastic:
        raise ValueError("master_weights=True and stochastic_rounding=True exclude each other: with master weights "
                         "the float32 master is updated and the param is its rounding to nearest")
    if stochastic and group["capturable"]:
        raise ValueError("stochastic_rounding=True does not support capturable=True: a captured step would replay "
                         "the same random bits")


def check_precision_options(group: dict) -> None:
    """The low-precision options against the dtypes of the group's params: a clear error before any step. (At a
    step, the op refuses a dtype that has no kernel for the options, with nothing changed.)"""
    check_modes(group)
    momentum_dtype, master, stochastic = group["momentum_dtype"], group["master_weights"], group["stochastic_rounding"]
    for p in group["params"]:
        if master and p.dtype not in LOW_PRECISION:
            raise ValueError(f"master_weights=True is for float16 and bfloat16 params; a param has dtype {p.dtype}, "
                             "which is updated at its own precision already")
        if stochastic and p.dtype != torch.bfloat16:
            raise ValueError(f"stochastic_rounding=True is for bfloat16 params; a param has dtype {p.dtype}")
        allowed = (p.dtype,) if p.is_complex() else BUFFER_DTYPES.get(p.dtype, (p.dtype,))
        if momentum_dtype is not None and momentum_dtype not in allowed:
            raise ValueError(f"momentum_dtype={momentum_dtype} is not supported for a param of dtype {p.dtype}; "
                             f"supported: {', '.join(str(d) for d in allowed)}")


def check_group(group: dict, values: bool = True) -> None:
    """A param group's values (values=False at a step: see check_hyperparameters)."""
    check_hyperparameters(group["lr"], group["momentum"], group["weight_decay"], values)
    if not group.get("nesterov", True) or group.get("dampening", 0) != 0:
        raise ValueError(
            "FusedNAG implements SGD with nesterov=True and dampening=0 only (use torch.optim.SGD for classical "
            f"momentum); this param group has nesterov={group.get('nesterov')}, dampening={group.get('dampening')}"
        )
    if group.get("differentiable"):
        raise ValueError("FusedNAG does not support differentiable=True: its fused kernel has no derivative "
                         "(as torch's SGD(fused=True))")
    if group.get("capturable") and any(isinstance(group[k], torch.Tensor) for k in ("momentum", "weight_decay")):
        raise ValueError("capturable=True needs momentum and weight_decay as numbers (only lr may be a tensor)")
    check_modes(group)


def check_clipping(max_grad_norm, norm_type) -> None:
    if max_grad_norm is not None:
        if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, Real):
            raise TypeError(f"max_grad_norm must be a number or None, got {type(max_grad_norm).__name__}")
        if not max_grad_norm > 0:  # (NaN too)
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm} (must be > 0, or None not to clip)")
    if isinstance(norm_type, bool) or not isinstance(norm_type, Real):
        raise TypeError(f"norm_type must be a number (2.0, 1.0, float('inf'), ...), got {type(norm_type).__name__}")
    if not norm_type > 0:
        raise ValueError(f"Invalid norm_type: {norm_type} (must be > 0 or inf)")


def check_sparse_group(group: dict) -> None:
    """Sparse gradients take torch's own per-tensor SGD (see _step.run_sparse), which knows none of these options."""
    if group["weight_decay"] != 0:
        raise RuntimeError("FusedNAG: a sparse gradient needs weight_decay=0 in its param group (torch.optim.SGD "
                           "fails there too: add(sparse, dense) is not supported)")
    for option in ("momentum_dtype", "master_weights", "stochastic_rounding"):
        if group[option]:
            raise ValueError(f"FusedNAG: {option} is not supported for params with sparse gradients")
