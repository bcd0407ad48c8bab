"""FusedNAG: torch.optim.SGD(nesterov=True, dampening=0) with one fused kernel launch per (device, dtype)."""

import sys

import torch
from torch.optim import Optimizer

from . import _rules, _step
from ._ops import _C
from ._step import DTensor

__all__ = ["FusedNAG"]

_PLAIN = _step.PLAIN


def _zero_process_group():
    """The process group of the torch.distributed.optim.ZeroRedundancyOptimizer that is constructing this optimizer
    over its rank's partition of the params, or None. max_grad_norm's norm is then summed across that group: each
    rank's partition holds only some of the params, and together they hold each one once."""
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    frame = sys._getframe(2) if zero is not None else None  # (the caller of FusedNAG.__init__)
    for _ in range(4):  # (ZeroRedundancyOptimizer._init_local_optimizer calls the constructor itself)
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if isinstance(owner, zero.ZeroRedundancyOptimizer):
            return owner.process_group
        frame = frame.f_back
    return None


def _check_no_shared_memory(params) -> None:
    """Params must not share memory: one launch updates all of them at once, so two views of the same elements would
    race (torch's for-loop updates them one after the other). Checked when a group is added, not at every step.
    Views whose byte spans overlap are compared byte by byte, so interleaved views (x[0::2] and x[1::2]) pass."""
    spans = []
    for p in params:
        if DTensor is not None and isinstance(p, DTensor):
            p = p.to_local()
        if type(p) not in _PLAIN or p.device.type == "meta" or p.numel() == 0:
            continue
        start = p.storage_offset() * p.element_size()
        extent = 1 + sum((size - 1) * stride for size, stride in zip(p.shape, p.stride(), strict=True))
        spans.append(((str(p.device), p.untyped_storage().data_ptr()), start, start + extent * p.element_size(), p))
    spans.sort(key=lambda s: s[:2])
    cluster, end = [], None  # views of one storage whose spans overlap, one after the other
    for storage, start, stop, p in [*spans, (None, 0, 0, None)]:
        if cluster and storage == cluster[0][0] and start < end:
            cluster.append((storage, start, stop, p))
            end = max(end, stop)
            continue
        if len(cluster) > 1 and _share_bytes([view for *_, view in cluster]):
            raise ValueError("FusedNAG: two params share memory (views of one tensor). The fused kernel updates all "
                             "params at once, so shared elements would be updated in an undefined order; optimize "
                             "the tensor they view instead")
        cluster, end = [(storage, start, stop, p)], stop


def _share_bytes(views) -> bool:
    """Whether views of one storage have a byte in common, from their sizes and strides alone (on the CPU)."""
    covered = []
    for view in views:
        size = view.element_size()
        elements = torch.arange(view.untyped_storage().nbytes() // size).as_strided(view.shape, view.stride(),
                                                                                     view.storage_offset())
        covered.append((elements.reshape(-1, 1) * size + torch.arange(size)).reshape(-1))
    covered = torch.cat(covered)
    return covered.unique().numel() < covered.numel()


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
        _rules.check_hyperparameters(lr, momentum, weight_decay)
        _rules.check_clipping(max_grad_norm, norm_type)
        if fused and foreach:  # torch's SGD refuses the same
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
                        capturable=capturable, momentum_dtype=momentum_dtype, master_weights=master_weights,
                        stochastic_rounding=stochastic_rounding, sr_seed=sr_seed)
        _rules.check_group(defaults)
        self._sparse = False  # a step has met a sparse gradient: later steps take the Python step at once
        self._zero_group = _zero_process_group()
        # Clipping is one setting of the optimizer, not of a param group: the norm is global, as clip_grad_norm_'s.
        self.max_grad_norm, self.norm_type = max_grad_norm, norm_type
        self._clipped = {}  # "norm": the last step's norm (a dict, which torch.compile lets a traced step update)
        # what the C++ step last found in self.state, while no dict it read has changed (Python >= 3.12; csrc/step.h)
        self._state_cache = _C._state_cache()
        super().__init__(params, defaults)

    def __getstate__(self):
        return {**super().__getstate__(), "max_grad_norm": self.max_grad_norm, "norm_type": self.norm_type}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_sparse", False)
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("norm_type", 2.0)
        self.__dict__.setdefault("_zero_group", None)
        self._clipped = {}
        self._state_cache = _C._state_cache()
        for group in self.param_groups:
            for key, value in _rules.LATER_DEFAULTS.items():
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict) -> None:
        # Check the group's own values, against its params' dtypes, before it joins the optimizer.
        params = param_group["params"]
        if not isinstance(params, set):  # (torch's own check rejects sets, below)
            param_group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        tensors = [p[1] if isinstance(p, tuple) else p for p in param_group["params"]]  # named params: (name, p)
        tensors = [p for p in tensors if isinstance(p, torch.Tensor)]  # torch's own check names the others
        group = {**self.defaults, **param_group, "params": tensors}
        _rules.check_group(group)
        _rules.check_precision_options(group)
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
                        dtype = torch.float32 if key == "master_param" else _rules.buffer_dtype(group, p.dtype)
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
        _step.step(self)  # (its stages, and how the C++ copy of them is chosen: nag_cuda/_step.py)
        return loss
