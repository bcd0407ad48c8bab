"""A differential fuzz test: FusedNAG and torch.optim.SGD(nesterov=True) side by side, on both step paths, under a
random sequence of steps and edits between them; params, momentum buffers and grads must agree bit for bit after
every step. A longer run: NAG_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py (default: 150 examples per path)."""

import copy
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from nag_cuda import FusedNAG

pytestmark = pytest.mark.usefixtures("step_path")

EXAMPLES = int(os.environ.get("NAG_FUZZ_EXAMPLES", "150"))
SHAPES = [(), (1,), (17,), (37,), (5, 9)]
DTYPES = [torch.float32, torch.float64]
BITS = {torch.float32: torch.int32, torch.float64: torch.int64}

# ---- strategies ----

lrs = st.one_of(st.sampled_from([0.0, 0.1, 1.0]), st.floats(0.0, 2.0))
momenta = st.one_of(st.sampled_from([0.9, 1.0]), st.floats(0.0, 1.5, exclude_min=True))
decays = st.one_of(st.sampled_from([0.0, 1e-2]), st.floats(0.0, 0.5))
hypers = st.fixed_dictionaries({}, optional=dict(lr=lrs, momentum=momenta, weight_decay=decays,
                                                 maximize=st.booleans()))
params = st.tuples(st.sampled_from(SHAPES), st.sampled_from(DTYPES))
group_index = st.integers(0, 2)  # (modulo the number of groups)
param_index = st.integers(0, 15)  # (modulo the number of params)
GRAD_KINDS = ["randn", "randn", "randn", "none", "zero", "inf", "nan"]

# None, or (max_grad_norm, norm_type)
clips = st.none() | st.tuples(st.floats(1e-3, 100.0), st.sampled_from([2.0, 1.0, math.inf]))

# fresh grads: a seed, each param's kind (cycled), a magnitude, and GradScaler's (log2 scale, found_inf) or None
a_step = st.tuples(st.just("step"), st.integers(0, 2**32 - 1),
                   st.lists(st.sampled_from(GRAD_KINDS), min_size=1, max_size=8), st.sampled_from([1.0, 1e-3, 1e3]),
                   st.none() | st.tuples(st.integers(-8, 16), st.booleans()))
an_edit = st.one_of(
    st.tuples(st.just("hyper"), group_index, hypers),
    st.tuples(st.just("tensor lr"), group_index, lrs, st.sampled_from(DTYPES)),
    st.tuples(st.just("append"), group_index, params, st.integers(0, 2**32 - 1)),
    st.tuples(st.just("double"), param_index),
    st.tuples(st.just("reverse"), group_index),  # (a list edit, which no dict watcher sees: csrc/step.h StateCache)
    st.tuples(st.just("clip"), clips),
    st.tuples(st.just("state dict round trip")),
)
# a step as likely as an edit (a_step | an_edit would make it one of seven branches, each as likely)
an_action = st.booleans().flatmap(lambda step: a_step if step else an_edit)

setups = st.tuples(st.lists(params, min_size=1, max_size=5), st.integers(1, 3), st.lists(group_index, max_size=5),
                   st.lists(hypers, min_size=3, max_size=3), st.integers(0, 2**32 - 1), clips)


# ---- the twins ----

def new_param(shape, dtype, seed):
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return torch.nn.Parameter(values), torch.nn.Parameter(values.clone())


def make_twins(setup):
    """FusedNAG over `ours`, torch's SGD over `theirs` (equal copies), in 1-3 groups."""
    specs, n_groups, assignment, group_hypers, seed, _ = setup
    n_groups = min(n_groups, len(specs))
    pairs = [new_param(shape, dtype, seed + i) for i, (shape, dtype) in enumerate(specs)]
    # param i < n_groups opens group i; the others join a group by `assignment`
    where = [i if i < n_groups else assignment[i % len(assignment)] % n_groups if assignment else 0
             for i in range(len(pairs))]
    groups = [[{"params": [pair[side] for pair, w in zip(pairs, where, strict=True) if w == g], **group_hypers[g]}
               for g in range(n_groups)] for side in (0, 1)]
    base = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    opt = FusedNAG(groups[0], **base)
    ref = torch.optim.SGD(groups[1], nesterov=True, foreach=False, **base)
    return [p for p, _ in pairs], [q for _, q in pairs], opt, ref


def in_groups(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def same(a, b) -> bool:
    """Bit for bit (signed zeros too), NaN equal to NaN (of any payload)."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    a, b = a.detach().masked_fill(nan, 0).contiguous(), b.detach().masked_fill(nan, 0).contiguous()
    return torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def check_twins(ours, theirs, opt, ref, step, grads=None):
    for i, (p, q) in enumerate(zip(ours, theirs, strict=True)):
        assert same(p, q), f"step {step}: param {i} differs: {p.detach()} vs {q.detach()}"
        buf = opt.state.get(p, {}).get("momentum_buffer")
        ref_buf = ref.state.get(q, {}).get("momentum_buffer")
        if ref_buf is None:  # a step that could have been skipped leaves -0.0 buffers as state
            assert buf is None or same(buf, torch.full_like(buf, -0.0)), f"step {step}: buffer {i} is {buf}"
        else:
            assert same(buf, ref_buf), f"step {step}: buffer {i} differs: {buf} vs {ref_buf}"
        if grads is not None:
            assert same(p.grad, grads[i]), f"step {step}: grad {i} differs: {p.grad} vs {grads[i]}"


# ---- the actions ----

def make_grad(p, kind, gen, magnitude):
    if kind == "none":
        return None
    if kind == "zero":
        return torch.zeros_like(p)
    grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * magnitude
    if kind in ("inf", "nan"):
        flat = grad.view(-1)
        at = int(torch.randint(0, flat.numel(), (), generator=gen))
        flat[at] = {"inf": -math.inf if at % 2 else math.inf, "nan": math.nan}[kind]
    return grad


def step_both(ours, theirs, opt, ref, clip, seed, kinds, magnitude, scaler, step):
    gen = torch.Generator().manual_seed(seed)
    for p in ours:
        p.grad = None
    for q in theirs:
        q.grad = None
    for k, (p, q) in enumerate(zip(in_groups(opt), in_groups(ref), strict=True)):
        grad = make_grad(p, kinds[k % len(kinds)], gen, magnitude)
        p.grad, q.grad = (None, None) if grad is None else (grad.clone(), grad.clone())
    position = {id(t): i for ts in (ours, theirs) for i, t in enumerate(ts)}
    assert [position[id(p)] for p in in_groups(opt)] == [position[id(q)] for q in in_groups(ref)]

    # torch: unscale_ (GradScaler), skip on found_inf; clip_grad_norm_, skip on a non-finite norm; step
    skipped = False
    with_grads = [q for q in in_groups(ref) if q.grad is not None]
    if scaler is not None:
        scale, found_inf = 2.0 ** scaler[0], scaler[1]
        for p in in_groups(opt):
            if p.grad is not None:
                p.grad.mul_(scale)  # (a power of two: exact, and exactly undone by the unscaling)
        inv_scale = torch.tensor(scale).double().reciprocal().float()
        for q in with_grads:
            q.grad.mul_(scale).mul_(inv_scale)  # as GradScaler.unscale_ would
        skipped = found_inf
        opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(float(found_inf))
    unscaled = [q.grad.clone() if q.grad is not None else None for q in theirs]
    for q in with_grads:  # FusedNAG converts the state of a param that moved at its next step with a grad; torch
        # casts state only on load: by hand
        buf = ref.state.get(q, {}).get("momentum_buffer")
        if buf is not None and buf.dtype != q.dtype:
            ref.state[q]["momentum_buffer"] = buf.to(q.dtype)
    opt.max_grad_norm, opt.norm_type = clip if clip is not None else (None, 2.0)
    try:
        opt.step()
    finally:
        if scaler is not None:
            del opt.grad_scale, opt.found_inf
    if clip is not None:
        max_norm, norm_type = clip
        norm = opt.last_grad_norm
        expected = get_total_norm([q.grad.double() for q in with_grads], norm_type).double()
        assert norm.dtype == torch.float32 and norm.shape == ()
        assert bool(norm.isfinite()) == bool(expected.isfinite()), f"step {step}: norm {norm} vs {expected}"
        if expected.isfinite():
            torch.testing.assert_close(norm.double(), expected, rtol=1e-5, atol=0)
        skipped = skipped or not expected.isfinite()
        if not skipped:
            clip_grads_with_norm_(with_grads, max_norm, norm)  # with FusedNAG's norm (more accurate than torch's)
    if not skipped:
        ref.step()
    event(f"step: {'skipped' if skipped else 'taken'}, {'scaled' if scaler else 'unscaled'}, "
          f"{'clipped' if clip else 'unclipped'}")
    # FusedNAG leaves the grads unclipped, and unscaled when it stepped (skipped: as they were, or unscaled)
    check_twins(ours, theirs, opt, ref, step, grads=None if skipped else unscaled)


def run_actions(setup, actions):
    ours, theirs, opt, ref = make_twins(setup)
    clip = setup[-1]
    for n, action in enumerate(actions):
        note(f"action {n}: {action}")
        kind, *args = action
        event(f"action: {kind}")
        if kind == "step":
            step_both(ours, theirs, opt, ref, clip, *args, step=n)
        elif kind == "hyper":
            g, changes = args
            for o in (opt, ref):
                o.param_groups[g % len(o.param_groups)].update(changes)
        elif kind == "tensor lr":
            g, lr, dtype = args
            for o in (opt, ref):
                o.param_groups[g % len(o.param_groups)]["lr"] = torch.tensor(lr, dtype=dtype)
        elif kind == "append":
            g, (shape, dtype), seed = args
            p, q = new_param(shape, dtype, seed)
            ours.append(p)
            theirs.append(q)
            opt.param_groups[g % len(opt.param_groups)]["params"].append(p)
            ref.param_groups[g % len(ref.param_groups)]["params"].append(q)
        elif kind == "double":
            i = args[0] % len(ours)
            for p in (ours[i], theirs[i]):
                p.data, p.grad = p.data.double(), None
        elif kind == "reverse":
            for o in (opt, ref):
                o.param_groups[args[0] % len(o.param_groups)]["params"].reverse()
        elif kind == "clip":
            clip = args[0]
        elif kind == "state dict round trip":
            for o in (opt, ref):
                o.load_state_dict(copy.deepcopy(o.state_dict()))
    # one last plain step, so that every edit is followed by a step
    step_both(ours, theirs, opt, ref, clip, 12345, ["randn"], 1.0, None, step=len(actions))


@settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(setup=setups, actions=st.lists(an_action, max_size=16))
def test_random_actions_match_torch(setup, actions):
    run_actions(setup, actions)
