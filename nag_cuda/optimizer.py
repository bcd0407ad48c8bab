"""FusedNAG: torch.optim.SGD(nesterov=True, dampening=0) with one fused kernel launch per (device, dtype)."""

from collections import defaultdict
from numbers import Real

import torch
from torch.optim import Optimizer
from torch.optim.sgd import sgd as torch_sgd

from ._ops import _C, grad_norm_function, ops, step_function
from .reference import nag_step_reference

__all__ = ["FusedNAG"]


def _check_hyperparameters(lr, momentum, weight_decay, values: bool = True) -> None:
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
            "FusedNAG implements SGD with nesterov=True and dampening=0 only (use torch.optim.SGD for classical "
            f"momentum); this param group has nesterov={group.get('nesterov')}, dampening={group.get('dampening')}"
        )
    if group.get("differentiable"):
        raise ValueError("FusedNAG does not support differentiable=True: its fused kernel has no derivative "
                         "(as torch's SGD(fused=True))")
    if group.get("capturable") and any(isinstance(group[k], torch.Tensor) for k in ("momentum", "weight_decay")):
        raise ValueError("capturable=True needs momentum and weight_decay as numbers (only lr may be a tensor)")


def _check_clipping(max_grad_norm, norm_type) -> None:
    if max_grad_norm is not None:
        if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, Real):
            raise TypeError(f"max_grad_norm must be a number or None, got {type(max_grad_norm).__name__}")
        if not max_grad_norm > 0:  # (NaN too)
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm} (must be > 0, or None not to clip)")
    if isinstance(norm_type, bool) or not isinstance(norm_type, Real):
        raise TypeError(f"norm_type must be a number (2.0, 1.0, float('inf'), ...), got {type(norm_type).__name__}")
    if not norm_type > 0:
        raise ValueError(f"Invalid norm_type: {norm_type} (must be > 0 or inf)")


def _check_sparse_group(group: dict) -> None:
    """Sparse gradients take torch's own per-tensor SGD (see _step_sparse), which knows none of the options below."""
    if group["weight_decay"] != 0:
        raise RuntimeError("FusedNAG: a sparse gradient needs weight_decay=0 in its param group (torch.optim.SGD "
                           "fails there too: add(sparse, dense) is not supported)")
    for option in ("momentum_dtype", "master_weights", "stochastic_rounding"):
        if group[option]:
            raise ValueError(f"FusedNAG: {option} is not supported for params with sparse gradients")


try:  # torch.distributed is optional in torch builds
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:
    DTensor = None

_PLAIN = (torch.Tensor, torch.nn.Parameter)

# Param-group keys that state dicts of torch's SGD or of older FusedNAG versions lack.
_LATER_DEFAULTS = dict(maximize=False, nesterov=True, dampening=0, foreach=None, differentiable=False, fused=None,
                       capturable=False, momentum_dtype=None, master_weights=False, stochastic_rounding=False,
                       sr_seed=None, sr_step=0)


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


def _check_no_shared_memory(params) -> None:
    """Params must not share memory: one launch updates all of them at once, so two views of the same elements would
    race (torch's for-loop updates them one after the other). Checked when a group is added, not at every step."""
    spans = []
    for p in params:
        if DTensor is not None and isinstance(p, DTensor):
            p = p.to_local()
        if type(p) not in _PLAIN or p.device.type == "meta" or p.numel() == 0:
            continue
        start = p.storage_offset() * p.element_size()
        extent = 1 + sum((size - 1) * stride for size, stride in zip(p.shape, p.stride(), strict=True))
        spans.append(((p.device, p.untyped_storage().data_ptr()), start, start + extent * p.element_size()))
    spans.sort(key=lambda s: (str(s[0][0]), s[0][1], s[1]))
    for (storage, _, end), (next_storage, next_start, _) in zip(spans, spans[1:]):
        if storage == next_storage and next_start < end:
            raise ValueError("FusedNAG: two params share memory (views of one tensor). The fused kernel updates all "
                             "params at once, so shared elements would be updated in an undefined order; optimize "
                             "the tensor they view instead")


class FusedNAG(Optimizer):
    r"""SGD with Nesterov momentum, fused into one kernel launch per (device, dtype) of each param group.

    A drop-in for ``torch.optim.SGD(params, lr, momentum, dampening=0, weight_decay, nesterov=True, maximize)``:
    the same signature, the same update, the same ``state[p]["momentum_buffer"]`` and the same param-group keys, so
    state dicts load in either direction. Per element (on x86-64 with AVX2 and on CUDA, float32 and float64 results
    are bit-identical to torch's; float16/bfloat16 are computed in float32 and rounded once)::

        g = -grad if maximize else grad
        g = g + weight_decay * p
        buf = g on p's first step, else momentum * buf + g
        p = p - lr * (g + momentum * buf)

    Args:
        params: iterable of parameters, of (name, parameter) pairs, or of dicts defining parameter groups.
        lr: learning rate (default: 1e-3); a float or a 1-element tensor. A tensor on the params' device is read by
            the kernel there (no host synchronisation), and LR schedulers update it in place.
        momentum: momentum factor, > 0 (default: 0.9; torch's 0 is invalid with Nesterov momentum).
        dampening: must be 0, as Nesterov momentum requires (default: 0).
        weight_decay: L2 penalty (default: 0).
        nesterov: must be True (default: True); for classical momentum use ``torch.optim.SGD``.
        maximize: maximize the objective instead of minimizing it (default: False).
        foreach, fused: accepted as torch's SGD takes them, and kept in the param groups; FusedNAG always runs its
            fused kernel (default: None).
        differentiable: must be False: the kernel has no derivative (default: False).
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
        max_grad_norm: clip the gradients by their global norm, as ``torch.nn.utils.clip_grad_norm_(every param
            with a grad, max_grad_norm, norm_type)`` before the step would (default: None, no clipping). One norm
            over all param groups, devices and DTensor shards; each grad is multiplied by
            ``min(1, max_grad_norm / (norm + 1e-6))`` as the kernel reads it, on the device, with no host
            synchronisation. The grads themselves are left as the step found them (unclipped). A non-finite norm
            skips the step, as GradScaler's ``found_inf`` does. The norm is in ``last_grad_norm``.
        norm_type: the norm of max_grad_norm: any p > 0, or ``float('inf')`` (default: 2.0).

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

    def __init__(self, params, lr=1e-3, momentum=0.9, dampening=0, weight_decay=0.0, nesterov=True, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, capturable=False,
                 momentum_dtype=None, master_weights=False, stochastic_rounding=False, sr_seed=None,
                 max_grad_norm=None, norm_type=2.0):
        _check_hyperparameters(lr, momentum, weight_decay)
        _check_clipping(max_grad_norm, norm_type)
        if fused and foreach:  # torch's SGD refuses the same
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
                        capturable=capturable, momentum_dtype=momentum_dtype, master_weights=master_weights,
                        stochastic_rounding=stochastic_rounding, sr_seed=sr_seed)
        _check_group(defaults)
        self._sparse = False  # a step has met a sparse gradient: later steps take the careful path at once
        self._state_cache = _C._state_cache()  # the C++ step's opt.state lookups, kept while they hold
        # Clipping is one setting of the optimizer, not of a param group: the norm is global, as clip_grad_norm_'s.
        self.max_grad_norm, self.norm_type = max_grad_norm, norm_type
        self._clipped = {}  # "norm": the last step's norm (a dict, which torch.compile lets a traced step update)
        super().__init__(params, defaults)

    def __getstate__(self):
        return {**super().__getstate__(), "max_grad_norm": self.max_grad_norm, "norm_type": self.norm_type}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_sparse", False)
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("norm_type", 2.0)
        self._clipped = {}
        self._state_cache = _C._state_cache()  # (not in the state: a copy looks up its own)
        for group in self.param_groups:
            for key, value in _LATER_DEFAULTS.items():
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict) -> None:
        # Check the group's own values, against its params' dtypes, before it joins the optimizer.
        params = param_group["params"]
        if not isinstance(params, set):  # (torch's own check rejects sets, below)
            param_group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        tensors = [p[1] if isinstance(p, tuple) else p for p in param_group["params"]]  # named params: (name, p)
        tensors = [p for p in tensors if isinstance(p, torch.Tensor)]  # torch's own check names the others
        group = {**self.defaults, **param_group, "params": tensors}
        _check_group(group)
        _check_precision_options(group)
        if len(set(tensors)) != len(tensors):  # torch warns that this "will cause an error" in future
            raise ValueError("FusedNAG: a parameter group lists the same parameter twice; the fused kernel would "
                             "update it in one pass, not twice as torch's for-loop does. List it once")
        super().add_param_group(param_group)  # names, defaults, and each param in one group only
        try:
            _check_no_shared_memory([p for g in self.param_groups for p in g["params"]])
        except ValueError:
            self.param_groups.pop()
            raise
        group = self.param_groups[-1]
        group.setdefault("sr_step", 0)  # stochastic rounding: steps taken, for the random bits
        if group["stochastic_rounding"] and group["sr_seed"] is None:
            group["sr_seed"] = int(torch.randint(0, 2**62, ()))  # from torch's generator: manual_seed reproduces it

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim.Optimizer.load_state_dict, except that momentum buffers and master weights keep their
        own dtype: torch casts all floating-point state to its param's dtype, which would round a float32 master or
        momentum_dtype buffer of a bfloat16 param to bfloat16. The load hooks see what they would see in torch: the
        state dict after every pre-hook is what gets loaded, and the post-hooks run on the loaded state."""
        loaded = {}

        def keep(optimizer, final_state_dict):  # the last pre-hook: the state dict as the other hooks left it
            loaded["state_dict"] = final_state_dict

        def restore_dtypes(optimizer):  # the first post-hook
            saved = loaded["state_dict"]
            for group, saved_group in zip(self.param_groups, saved["param_groups"], strict=True):
                for p, i in zip(group["params"], saved_group["params"], strict=True):
                    for key, value in saved["state"].get(i, {}).items():
                        if key not in ("master_param", "momentum_buffer") or not isinstance(value, torch.Tensor):
                            continue
                        dtype = torch.float32 if key == "master_param" else _buffer_dtype(group, p.dtype)
                        if dtype != self.state[p][key].dtype:
                            self.state[p][key] = value.to(device=p.device, dtype=dtype)

        pre = self.register_load_state_dict_pre_hook(keep)
        post = self.register_load_state_dict_post_hook(restore_dtypes, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()

    @property
    def last_grad_norm(self):
        """max_grad_norm: the global grad norm of the last step (before clipping, of the unscaled grads under
        GradScaler), as a 0-dim float32 tensor on the device of the first param with a grad, as clip_grad_norm_
        returns it; None before the first step. Reading its value (`.item()`) synchronises with the device."""
        return self._clipped.get("norm")

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
        if not self._sparse:
            try:
                if not self._step_plain():
                    self._step(careful=False)
                self._advance()
                return loss
            except RuntimeError as error:
                if "kernel launch failed" in str(error):  # the only error raised after a kernel has written
                    raise
        # Nothing was written. The careful path looks at every tensor: sparse gradients, and state whose param
        # has moved to another dtype or device since (model.double(), model.to(...)). It raises what is still wrong.
        self._step(careful=True)
        self._advance()
        return loss

    def _groups(self):
        """Per param group, what its step needs: (group, settings, lr, (momentum, weight_decay, maximize), may_skip,
        sr_seed). Groups with equal `settings` share one op call per device (many one-param groups cost one call).
        may_skip: GradScaler may skip this step on the device, or the step may be captured and replayed (see
        _gather). For the Python path: the C++ one reads the groups alike (read_group in csrc/nag_step.cpp)."""
        found_inf = getattr(self, "found_inf", None)
        for index, group in enumerate(self.param_groups):
            _check_group(group, values=False)
            lr = group["lr"]
            tensor_lr = isinstance(lr, torch.Tensor)  # read by the kernel on the device (LR schedulers fill_ it)
            hyper = (float(group["momentum"]), float(group["weight_decay"]), bool(group["maximize"]))
            sr_seed = None
            if group["stochastic_rounding"]:  # a different key for every step and group, hashed by the kernels
                sr_seed = (group["sr_seed"] + group["sr_step"] * 0x9E3779B97F4A7C15
                           + index * 0xD1B54A32D192ED03) % 2**63
            lr = lr if tensor_lr else float(lr)
            settings = (id(lr) if tensor_lr else lr, hyper, group["master_weights"], sr_seed)
            yield group, settings, lr, hyper, found_inf is not None or group["capturable"], sr_seed

    def _step_plain(self) -> bool:
        """The step for plain tensors (Tensor or Parameter, strided grads, on a device with a kernel): one C++ call
        (csrc/nag_step.cpp) reads every param group, grad and state entry and makes the op calls, with no Python code
        per group or tensor. Returns False, having changed nothing, where something needs the Python path (_step): a
        DTensor or other subclass, a sparse grad, a group value that the C++ reading leaves to _groups (which raises
        on a bad one), torch.compile tracing the step, a torch function mode."""
        if (torch.compiler.is_compiling() or type(self.state) not in (defaultdict, dict)
                or torch._C._is_torch_function_mode_enabled()):
            return False
        clip = None
        if self.max_grad_norm is not None:
            _check_clipping(self.max_grad_norm, self.norm_type)  # (also when set after construction)
            clip = (float(self.max_grad_norm), float(self.norm_type))
        done = _C._step(self.param_groups, self.state, getattr(self, "grad_scale", None),
                        getattr(self, "found_inf", None), self._state_cache, clip)
        if isinstance(done, torch.Tensor):
            self._clipped["norm"] = done
        return done is not False

    def _advance(self) -> None:
        for group in self.param_groups:
            if group["stochastic_rounding"]:
                group["sr_step"] += 1

    def _step(self, careful: bool) -> None:
        """The step in Python, for what _step_plain leaves (and what torch.compile traces); careful: see step()."""
        # Set by torch.amp.GradScaler.step() (see _step_supports_amp_scaling): None outside of it.
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        calls, new_state, sparse = {}, [], []
        for group, settings, lr, hyper, may_skip, sr_seed in self._groups():
            sparse_here = [] if careful else None
            for device, lists in self._gather(group, new_state, may_skip, sparse_here).items():
                call = calls.get((device, settings))
                if call is not None:
                    for merged, more in zip(call[1], lists, strict=True):
                        merged.extend(more)
                    continue
                kwargs = dict(grad_scale=_on(device, grad_scale), found_inf=_on(device, found_inf))
                if sr_seed is not None:
                    kwargs["sr_seed"] = sr_seed
                tensor_lr = isinstance(lr, torch.Tensor)
                lr_here = _on(device, lr) if tensor_lr else lr
                calls[device, settings] = (step_function(device, tensor_lr), lists, (lr_here, *hyper), kwargs)
            if sparse_here:
                _check_sparse_group(group)
                sparse.append((group, sparse_here))
        calls = list(calls.values())
        norm = coef = None
        if self.max_grad_norm is not None:
            _check_clipping(self.max_grad_norm, self.norm_type)
            norm, coef = self._clip_coefficient(grad_scale)
        for _, lists, _, kwargs in calls:
            if len(lists) == 5:  # master weights: a keyword argument of the op
                kwargs["master_params"] = lists.pop()
            if coef is not None:
                kwargs["grad_coef"] = _on(lists[0][0].device, coef)
        # Nothing changes unless every call will succeed: a bad group or a mismatched momentum buffer leaves all
        # parameters and all momentum state as they were. The compiled op checks its arguments before it writes, so
        # the first call checks itself (on the fast path); the others (and the reference) are checked up front.
        for i, (fn, (params, grads, bufs, first), (lr, *_), kwargs) in enumerate(calls):
            if i > 0 or careful or fn is nag_step_reference:
                ops._check_step(params, grads, bufs, first, lr if isinstance(lr, torch.Tensor) else None,
                                grad_scale=kwargs.get("grad_scale"), found_inf=kwargs.get("found_inf"),
                                master_params=kwargs.get("master_params"), stochastic="sr_seed" in kwargs,
                                grad_coef=kwargs.get("grad_coef"))
        for fn, lists, hyper, kwargs in calls:
            fn(*lists, *hyper, **kwargs)
        if norm is not None:
            self._clipped["norm"] = norm
        for group, entries in sparse:
            self._step_sparse(group, entries, grad_scale, found_inf)
        if sparse:  # (only then: torch 2.11's dynamo refuses any attribute write on the optimizer it traces)
            self._sparse = True
        # New state becomes state only once the kernel has written it (or, under GradScaler, zeroed: see _gather).
        for p, key, value in new_state:
            self.state[p][key] = value

    def _clip_coefficient(self, grad_scale):
        """max_grad_norm on the Python path: the global norm of every grad and the clip coefficient (NaN where the
        norm is not finite), with no host synchronisation. Each device's grads are
        reduced by the kernel; DTensor shards are reduced on their rank and then across the mesh (the partial results
        of sharded mesh dimensions summed, as clip_grad_norm_ does for DTensors)."""
        norm_type = float(self.norm_type)
        local, sharded = defaultdict(list), defaultdict(list)
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("FusedNAG: max_grad_norm does not support sparse gradients; clip them with "
                                       "torch.nn.utils.clip_grad_norm_ before step() instead")
                if DTensor is not None and isinstance(grad, DTensor):
                    sharded[grad.device_mesh, grad.placements].append(grad.to_local())
                else:
                    local[grad.device].append(grad)

        def reduce(grads):
            device = grads[0].device
            return grad_norm_function(device)(grads, norm_type, grad_scale=_on(device, grad_scale))

        partials = [reduce(grads) for grads in local.values()]
        for (mesh, placements), grads in sharded.items():
            if any(placement.is_partial() for placement in placements):
                raise ValueError("FusedNAG: max_grad_norm needs reduced gradients; got a DTensor grad with placements "
                                 f"{placements}")
            shard = Partial("max" if norm_type == float("inf") else "sum")
            partial = DTensor.from_local(reduce(grads), mesh, [shard if placement.is_shard() else Replicate()
                                                               for placement in placements])
            partials.append(partial.full_tensor())
        total = torch.zeros((), dtype=torch.float32) if not partials else partials[0]
        for partial in partials[1:]:
            partial = partial.to(total.device, non_blocking=True)
            total = torch.maximum(total, partial) if norm_type == float("inf") else total + partial
        return ops.clip_coef(total, float(self.max_grad_norm), norm_type)

    def _gather(self, group: dict, new_state: list, may_skip: bool, sparse: list | None) -> dict:
        """The kernel's tensor lists for one param group, per device: (params, grads, buffers, is_first), and the
        master weights last when the group has them.

        This loop runs for every parameter at every step, so on the fast path (sparse is None) it only collects;
        the op checks the tensors. The careful path (a list given) also sets aside params with sparse gradients,
        and moves state to its param's dtype and device where the param has moved since.
        may_skip: GradScaler may skip this step on the device, which the host does not know without a sync, or
        the step may be captured in a CUDA graph and replayed. New buffers are then -0.0, stepped as not-first:
        momentum * -0.0 + g is exactly the first step's buffer g, signed zeros included, a skipped step leaves
        valid zeros (torch's fused SGD leaves uninitialised memory as state there), and a replayed step is a
        steady-state step.
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
            if sparse is not None:
                if grad.is_sparse:
                    sparse.append((p, grad, buf))
                    continue
                buf = self._follow(p, "momentum_buffer", buf, _buffer_dtype(group, p.dtype), new_state)
            first = buf is None and not may_skip
            if buf is None:
                dtype = _buffer_dtype(group, p.dtype)
                if may_skip:
                    buf = torch.full_like(p, complex(-0.0, -0.0) if p.is_complex() else -0.0, dtype=dtype,
                                          memory_format=torch.preserve_format)
                else:
                    buf = torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)
                new_state.append((p, "momentum_buffer", buf))
            master = None
            if master_weights:
                master = st.get("master_param") if st else None
                if sparse is not None:
                    master = self._follow(p, "master_param", master, torch.float32, new_state)
                if master is None:
                    master = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
                    new_state.append((p, "master_param", master))
            if type(p) not in _PLAIN:
                p, grad, buf, master = _local(p, grad, buf, master)
            lists = by_device.get(p.device)
            if lists is None:
                lists = by_device[p.device] = [[], [], [], [], []] if master_weights else [[], [], [], []]
            lists[0].append(p)
            lists[1].append(grad)
            lists[2].append(buf)
            lists[3].append(first)
            if master_weights:
                lists[4].append(master)
        return by_device

    @staticmethod
    def _follow(p, key, value, dtype, new_state):
        """State `value` of param p, moved to p's device and to `dtype` if p has moved since it was made (as
        load_state_dict casts state to its param); the moved copy becomes state once the step succeeds."""
        if value is None or (value.dtype == dtype and value.device == p.device):
            return value
        value = value.to(device=p.device, dtype=dtype)
        new_state.append((p, key, value))
        return value

    def _step_sparse(self, group, entries, grad_scale, found_inf) -> None:
        """Params with sparse gradients (nn.Embedding(sparse=True)) take torch's own per-tensor SGD, as torch's SGD
        does for them: the same math, and a sparse momentum buffer. Under GradScaler this path reads found_inf on
        the host (as torch's non-fused optimizers do) and unscales the gradients with torch's own kernel."""
        if found_inf is not None and found_inf.item() != 0:
            return
        params, grads, bufs = (list(t) for t in zip(*entries, strict=True))
        if grad_scale is not None:
            inv_scale = grad_scale.double().reciprocal().float()  # as GradScaler.unscale_ computes it
            for i, (p, grad) in enumerate(zip(params, grads, strict=True)):
                if grad.dtype == torch.float16:  # as GradScaler.unscale_: fp16 sparse grads are coalesced first
                    p.grad = grads[i] = grad = grad.coalesce()
                torch._amp_foreach_non_finite_check_and_unscale_([grad._values()], torch.zeros_like(inv_scale),
                                                                 inv_scale.to(grad.device))
        torch_sgd(params, grads, bufs, has_sparse_grad=True, foreach=False, fused=False,
                  weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"], dampening=0,
                  nesterov=True, maximize=group["maximize"])
        for p, buf in zip(params, bufs, strict=True):
            self.state[p]["momentum_buffer"] = buf
