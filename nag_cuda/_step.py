"""FusedNAG.step(), stated once, in the order it runs. This file is the specification of a step; csrc/step*.cpp is a
copy of it in C++ for plain tensors, stage for stage (csrc/step.h), which step() asks first (see route).

  read groups  every param group's settings as plain values, checked. float() and bool() of a value may run user
               code: this stage comes before anything is gathered, so nothing gathered can be dropped by it.
  gather       each param that has a grad, with its state, into one op call per (device, settings). New state (a
               momentum buffer, a master copy) and state converted to a param that moved to another dtype or device
               is allocated here, and becomes state at commit.
  clip         max_grad_norm: the global norm and the clip coefficient, on the device (reads grads, writes nothing).
  check        every op call's arguments, as the kernels check them: bad input raises here, with nothing changed.
  run          the op calls, the first writes of the step. After the first call has written, only a failing kernel
               can stop the step, and the error then says that the step is incomplete.
  commit       new state into opt.state, the norm into last_grad_norm, sr_step advanced.

A new momentum buffer of a step that may be skipped on the device (GradScaler's found_inf, a non-finite grad norm
under max_grad_norm) or replayed (capturable) is -0.0, stepped as not-first: momentum * -0.0 + g is exactly the
first step's buffer g, signed zeros included, and a skipped step leaves valid zeros as state.
"""

from collections import defaultdict

import torch
from torch.optim.sgd import sgd as torch_sgd

from . import _rules
from ._ops import _C, grad_norm_function, ops, step_function

try:  # torch.distributed is optional in torch builds
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:
    DTensor = None

PLAIN = (torch.Tensor, torch.nn.Parameter)

# Whether step() asks the C++ copy of these stages first (route). Tests set it to False to run the Python stages.
CPP_STEP = True


def step(opt) -> None:
    """One step of the FusedNAG `opt` (its grad_scale and found_inf are set by torch.amp.GradScaler.step())."""
    grad_scale, found_inf = getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)
    clip = clip_settings(opt)
    if route(opt, clip):
        done = _C._step(opt.param_groups, opt.state, grad_scale, found_inf, clip, opt._state_cache)
        if done is not False:  # (False: "not mine", with nothing changed)
            commit_groups(opt, done if clip is not None else None, {})
            return
    reads = read_groups(opt, scaled=found_inf is not None, clipped=clip is not None)
    calls, sparse = gather(opt, reads, grad_scale, found_inf)
    norm = clip_calls(opt, calls, grad_scale, clip) if clip is not None else None
    check(calls, sparse)
    run(opt, calls)
    commit(opt, calls, sparse)
    run_sparse(opt, sparse, grad_scale, found_inf)  # (torch's own SGD, which keeps its state in opt.state itself)
    commit_groups(opt, norm, {read.group_index: read.seed for read in reads if read.seed_drawn})


def route(opt, clip) -> bool:
    """Whether the C++ step may take this step (it may still answer "not mine"). Not while torch.compile traces the
    step, under a torch function or dispatch mode (their Python code would run inside the C++ step), for a state
    that is not a dict, once a sparse gradient was met (the C++ step declines those), or for a clipped step under
    ZeroRedundancyOptimizer (its norm is summed across ranks, see clip_calls)."""
    return (CPP_STEP and not torch.compiler.is_compiling() and not opt._sparse
            and type(opt.state) in (defaultdict, dict) and not torch._C._is_torch_function_mode_enabled()
            and torch._C._len_torch_dispatch_stack() == 0 and (clip is None or opt._zero_group is None))


def clip_settings(opt):
    """(max_grad_norm, norm_type) as floats, checked (they may be set after construction), or None."""
    if opt.max_grad_norm is None:
        return None
    _rules.check_clipping(opt.max_grad_norm, opt.norm_type)
    return float(opt.max_grad_norm), float(opt.norm_type)


# ---- read groups ----

class GroupRead:
    """One param group's settings for this step. Groups with equal `settings` share an op call per device."""

    def __init__(self, group, group_index, scaled, clipped):
        _rules.check_group(group, values=False)
        self.group, self.group_index = group, group_index
        lr = group["lr"]
        self.tensor_lr = isinstance(lr, torch.Tensor)  # read by the kernel on the device (LR schedulers fill_ it)
        self.lr = lr if self.tensor_lr else float(lr)
        self.hyper = (float(group["momentum"]), float(group["weight_decay"]), bool(group["maximize"]))
        self.master = bool(group["master_weights"])
        # GradScaler or a non-finite grad norm may skip the step on the device, which the host does not know without
        # a sync; a capturable step may be replayed (see the module's docstring). bool(), not `not`, `==` or `is`:
        # torch >= 2.15's dynamo gives a traced group's "capturable" as an object that only bool() and `if` read
        self.may_skip = scaled or clipped or bool(group["capturable"])
        self.seed, self.seed_drawn, self.sr_seed = group["sr_seed"], False, None
        if group["stochastic_rounding"]:
            if self.seed is None:  # turned on after the group was added: a seed as add_param_group draws it
                self.seed, self.seed_drawn = int(torch.randint(0, 2**62, ())), True
            # a different key for every step and group, hashed by the kernels
            self.sr_seed = (self.seed + group["sr_step"] * 0x9E3779B97F4A7C15
                            + group_index * 0xD1B54A32D192ED03) % 2**63
        self.settings = (id(lr) if self.tensor_lr else self.lr, self.hyper, self.master, group["momentum_dtype"],
                         self.sr_seed)


def read_groups(opt, scaled: bool, clipped: bool) -> list:
    return [GroupRead(group, i, scaled, clipped) for i, group in enumerate(opt.param_groups)]


# ---- gather ----

class Call:
    """One op call: the params of one or more groups with the same settings, on one device."""

    def __init__(self, device, read, grad_scale, found_inf):
        self.device = device
        self.fn = step_function(device, read.tensor_lr)
        self.lr = device_lr(read.lr, device) if read.tensor_lr else read.lr
        self.hyper = read.hyper
        self.params, self.grads, self.bufs, self.first = [], [], [], []
        self.new_state = []  # (param, key, value), committed once the call has run
        self.masters = [] if read.master else None
        self.kwargs = dict(grad_scale=on(device, grad_scale), found_inf=on(device, found_inf))
        if read.sr_seed is not None:
            self.kwargs["sr_seed"] = read.sr_seed

    def add(self, p, grad, buf, first, master):
        self.params.append(p)
        self.grads.append(grad)
        self.bufs.append(buf)
        self.first.append(first)
        if self.masters is not None:
            self.masters.append(master)

    def op_kwargs(self):
        return self.kwargs if self.masters is None else {**self.kwargs, "master_params": self.masters}


def on(device, t):
    """A scalar tensor (GradScaler's, the clip coefficient) on the device of the params it applies to."""
    return None if t is None else t.to(device, non_blocking=True)


def device_lr(lr, device):
    """A tensor lr as the kernels read it: on the params' device, float32 or float64, its negation bit resolved."""
    lr = lr.to(device, non_blocking=True).resolve_neg()
    return lr if lr.dtype in (torch.float32, torch.float64) else lr.double()


def gather(opt, reads, grad_scale, found_inf):
    """The op calls of the step (each with its new state) and, per group, its params with sparse grads."""
    state = opt.state
    calls, sparse, seen = {}, [], set()
    for read in reads:
        group = read.group
        sparse_here = []
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if id(p) in seen:  # (add_param_group refuses it; a list edited later can have it)
                raise ValueError("FusedNAG: a parameter is listed twice in the param groups; the fused kernel would "
                                 "update it in one pass, not twice as torch's for-loop does. List it once")
            seen.add(id(p))
            st = state.get(p)
            buf = st.get("momentum_buffer") if st else None
            if grad.is_sparse:
                sparse_here.append((p, grad, buf))
                continue
            made = []  # (p, key, value): this param's new state, which its call commits
            dtype = _rules.buffer_dtype(group, p.dtype)
            buf = follow(p, "momentum_buffer", buf, dtype, made)
            first = buf is None and not read.may_skip
            if buf is None:
                if read.may_skip:
                    buf = torch.full_like(p, complex(-0.0, -0.0) if p.is_complex() else -0.0, dtype=dtype,
                                          memory_format=torch.preserve_format)
                else:
                    buf = torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)
                made.append((p, "momentum_buffer", buf))
            master = None
            if read.master:
                master = follow(p, "master_param", st.get("master_param") if st else None, torch.float32, made)
                if master is None:
                    master = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
                    made.append((p, "master_param", master))
            if type(p) not in PLAIN:
                p, grad, buf, master = local(p, grad, buf, master)
            call = calls.get((p.device, read.settings))
            if call is None:
                call = calls[p.device, read.settings] = Call(p.device, read, grad_scale, found_inf)
            call.add(p, grad, buf, first, master)
            call.new_state += made
        if sparse_here:
            sparse.append((group, sparse_here))
    return list(calls.values()), sparse


def follow(p, key, value, dtype, made):
    """State `value` of param p, moved to p's device and to `dtype` if p has moved since it was made (as
    load_state_dict casts state to its param); the moved copy becomes state at commit."""
    if value is None or (value.dtype == dtype and value.device == p.device):
        return value
    value = value.to(device=p.device, dtype=dtype)
    made.append((p, key, value))
    return value


def local(p, grad, buf, master):
    """DTensor params (FSDP2, tensor parallel): the kernel updates this rank's shard in place, with no gather; the
    buffer (and master) stays a DTensor in the state, sharded like its param."""
    if DTensor is None or not isinstance(p, DTensor):
        return p, grad, buf, master
    if not isinstance(grad, DTensor) or grad.placements != p.placements:
        raise ValueError(f"FusedNAG: the grad of a DTensor parameter with placements {p.placements} must be a DTensor "
                         f"with the same placements, got {getattr(grad, 'placements', type(grad).__name__)}")
    return tuple(t.to_local() if isinstance(t, DTensor) else t for t in (p, grad, buf, master))


# ---- clip ----

def clip_calls(opt, calls, grad_scale, clip):
    """max_grad_norm: the global norm of every grad and each call's clip coefficient (NaN where the norm is not
    finite, which skips the step), with no host synchronisation. Each device's grads are reduced by the kernel;
    DTensor shards on their rank and then across the mesh (the partial results of sharded mesh dimensions summed, as
    clip_grad_norm_ does for DTensors); under ZeroRedundancyOptimizer, this rank's partition and then across its
    process group, since the partitions together hold every param once."""
    max_norm, norm_type = clip
    local_grads, sharded = defaultdict(list), defaultdict(list)
    for group in opt.param_groups:
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
                local_grads[grad.device].append(grad)

    def reduce(grads):
        device = grads[0].device
        return grad_norm_function(device)(grads, norm_type, grad_scale=on(device, grad_scale))

    partials = [reduce(grads) for grads in local_grads.values()]
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
    if opt._zero_group is not None:
        reduce_op = torch.distributed.ReduceOp.MAX if norm_type == float("inf") else torch.distributed.ReduceOp.SUM
        torch.distributed.all_reduce(total, op=reduce_op, group=opt._zero_group)
    norm, coef = ops.clip_coef(total, max_norm, norm_type)
    for call in calls:
        call.kwargs["grad_coef"] = on(call.device, coef)
    return norm


# ---- check ----

def check(calls, sparse) -> None:
    """Every call's arguments as the kernels check them (the reference's too), before the first call writes."""
    for call in calls:
        kwargs = call.kwargs
        ops._check_step(call.params, call.grads, call.bufs, call.first,
                        call.lr if isinstance(call.lr, torch.Tensor) else None, grad_scale=kwargs["grad_scale"],
                        found_inf=kwargs["found_inf"], master_params=call.masters, stochastic="sr_seed" in kwargs,
                        grad_coef=kwargs.get("grad_coef"))
    for group, _ in sparse:
        _rules.check_sparse_group(group)


# ---- run ----

def run(opt, calls) -> None:
    for i, call in enumerate(calls):
        if i == 0 or torch.compiler.is_compiling():  # (nothing is written before the first call's kernels)
            call.fn(call.params, call.grads, call.bufs, call.first, call.lr, *call.hyper, **call.op_kwargs())
            continue
        try:
            call.fn(call.params, call.grads, call.bufs, call.first, call.lr, *call.hyper, **call.op_kwargs())
        except Exception as error:
            commit(opt, calls[:i], ())  # (the state of the calls that ran)
            raise RuntimeError(f"FusedNAG: op call {i + 1} of {len(calls)} of this step failed in its kernel, after "
                               f"the calls before it had updated their params: this step is incomplete") from error


def run_sparse(opt, sparse, grad_scale, found_inf) -> None:
    """Params with sparse gradients (nn.Embedding(sparse=True)) take torch's own per-tensor SGD, as torch's SGD
    does for them: the same math, and a sparse momentum buffer. Under GradScaler this path reads found_inf on
    the host (as torch's non-fused optimizers do) and unscales the gradients with torch's own kernel."""
    if not sparse or (found_inf is not None and found_inf.item() != 0):
        return
    for group, entries in sparse:
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
            opt.state[p]["momentum_buffer"] = buf


# ---- commit ----

def commit(opt, calls, sparse) -> None:
    """New state becomes state only once the kernels have written it (or, for a step that may be skipped, zeroed)."""
    for call in calls:
        for p, key, value in call.new_state:
            opt.state[p][key] = value
    if sparse:  # later steps take the Python stages at once (only then: torch 2.11's dynamo refuses any attribute
        opt._sparse = True  # write on the optimizer it traces)


def commit_groups(opt, norm, drawn_seeds) -> None:
    """What a step advances in the optimizer itself, on either path."""
    opt._clipped["norm"] = norm
    for index, seed in drawn_seeds.items():
        opt.param_groups[index]["sr_seed"] = seed
    for group in opt.param_groups:
        if group["stochastic_rounding"]:
            group["sr_step"] += 1

