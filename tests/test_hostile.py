"""Hostile use of FusedNAG.step(): other threads, hyperparameters whose __float__ runs code, non-finite and
overflowing grad norms, a kernel that fails midway through a step, edited param lists, views, options turned on late,
and the ops' own errors. Every test runs on both step paths (the C++ stages and the Python ones, conftest.step_path)
and compares with torch.optim.SGD(nesterov=True) (and torch's clipping), bit for bit; where FusedNAG refuses, it checks
the error and that nothing changed: params, grads, opt.state, last_grad_norm and the params' version counters."""

import contextlib
import gc
import math
import sys
import threading
import time

import pytest
import torch
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from nag_cuda import FusedNAG
from test_host_path import HYPER, assert_same, give_grads, twins

pytestmark = pytest.mark.usefixtures("step_path")  # every test on both step paths (conftest.py)

SHAPES = [(37,), (5, 9), (3, 4, 5)]  # above the SIMD width, with remainders


def leaves(shapes, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    return ours, [torch.nn.Parameter(p.detach().clone()) for p in ours]


def bits(t):
    """A tensor's bytes (NaN equals NaN, -0.0 differs from 0.0)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


# ---- "nothing changed" ----

def snapshot(params, opt):
    norm = opt.last_grad_norm
    return dict(
        params=[p.detach().clone() for p in params],
        versions=[p._version for p in params],
        grads=[(p.grad, None if p.grad is None else p.grad.clone()) for p in params],
        state={id(p): (p, {k: (v, v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()})
               for p, st in opt.state.items()},
        norm=(norm, None if norm is None else norm.clone()),
        lists=[list(g["params"]) for g in opt.param_groups],
    )


def assert_unchanged(before, params, opt):
    after = snapshot(params, opt)
    for i, (a, b) in enumerate(zip(before["params"], after["params"], strict=True)):
        assert same_bits(a, b), f"param {i} changed"
    assert before["versions"] == after["versions"], "a param's version counter moved"
    for i, ((grad, value), (grad_now, _)) in enumerate(zip(before["grads"], after["grads"], strict=True)):
        assert grad_now is grad, f"grad {i} replaced"
        assert grad is None or same_bits(grad, value), f"grad {i} changed"
    assert before["state"].keys() == after["state"].keys(), "opt.state gained or lost params"
    for key, (p, st) in before["state"].items():
        st_now = after["state"][key][1]
        assert st.keys() == st_now.keys(), "a param's state gained or lost keys"
        for k, (obj, value) in st.items():
            assert st_now[k][0] is obj, f"state {k} replaced"
            assert not isinstance(obj, torch.Tensor) or same_bits(obj, value), f"state {k} changed"
    norm, value = before["norm"]
    assert opt.last_grad_norm is norm and (norm is None or same_bits(norm, value)), "last_grad_norm changed"
    assert all(a == b for a, b in zip(before["lists"], after["lists"], strict=True))


# ---- 1. another thread changes grads while a large step runs without the GIL ----

def test_grads_replaced_by_another_thread_during_a_large_step(step_path):
    """A step of over 2**20 elements in two groups (two op calls) releases the GIL around its op calls; meanwhile
    another thread replaces and drops the grads of the second group. The step uses the grads as they were when it
    began (read before the GIL is released). "Began": when FusedNAG.step's body starts, which a step pre-hook marks:
    torch's Optimizer.step wrapper releases the GIL before that (record_function calls an op), and so may a first
    step of the Python stages, which allocates buffers with torch calls while it still reads grads (as torch's own
    SGD does): there, the thread starts from the second step on. The switch interval is made long, so that the other
    thread runs only where the main thread releases the GIL."""
    ours, theirs = leaves([(1 << 20,), (37,), (5, 9), (333,)])
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.01}]  # noqa: E731
    opt, ref = FusedNAG(groups(ours), **HYPER), torch.optim.SGD(groups(theirs), nesterov=True, **HYPER)
    run = {}
    opt.register_step_pre_hook(lambda *args: run["go"].set() if run["threaded"] else None)
    opt.register_step_post_hook(lambda *args: run["meddled"].append(run["count"][0]))
    meddled = []  # grads replaced while the step ran, per step
    interval = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    try:
        for step in range(4):
            for params in (ours, theirs):
                give_grads(params, step)
            go, stop, count, errors = threading.Event(), threading.Event(), [0], []
            run.update(go=go, count=count, meddled=meddled, threaded=step_path == "cpp" or step > 0)

            def meddle():
                try:
                    go.wait()
                    i = 0
                    while not stop.is_set():
                        for p in ours[2:]:
                            p.grad = torch.randn_like(p) if i % 2 else None
                        i += 1
                        count[0] += 1
                        time.sleep(0)
                except BaseException as error:  # noqa: BLE001 (reported by the main thread)
                    errors.append(error)

            thread = threading.Thread(target=meddle, daemon=True)
            thread.start()
            opt.step()
            stop.set()
            go.set()
            thread.join(timeout=60)
            assert not thread.is_alive() and not errors, errors
            ref.step()
            assert_same(ours, theirs, opt, ref)
    finally:
        sys.setswitchinterval(interval)
    # (both paths release the GIL around a large step's op calls: the C++ stages themselves, torch.ops calls too)
    assert sum(meddled) > 0, f"the other thread never ran during a step: {meddled}"


# ---- 2. a hyperparameter whose __float__ runs Python code ----

class Hyper:
    """A hyperparameter known only by its __float__ (torch's SGD refuses it: add() takes no such alpha), which runs
    `effect` while armed: once (then disarms), or at every call."""

    def __init__(self, value, effect=None, once=True):
        self.value, self.effect, self.once, self.armed = value, effect, once, False

    def __float__(self):
        if self.armed:
            self.armed = not self.once
            self.effect()
        return self.value


class ComparableHyper(Hyper):
    """As Hyper, and comparable with numbers by its value (as numpy scalars are), without running `effect`."""

    def __lt__(self, other):
        return self.value < other

    def __le__(self, other):
        return self.value <= other

    def __gt__(self, other):
        return self.value > other

    def __ge__(self, other):
        return self.value >= other


def drop_grads(opt, params):
    params[0].grad = None  # (group 1, read already)
    params[4].grad = None  # (group 2, whose momentum runs the code)


def drop_params(opt, params):
    opt.param_groups[0]["params"].pop()
    opt.param_groups[1]["params"].pop(0)


def replace_params_list(opt, params):
    group = opt.param_groups[1]
    group["params"] = group["params"][1:]


EFFECTS = {"grads dropped": drop_grads, "params dropped": drop_params, "params list replaced": replace_params_list}
HYPER_KINDS = {"only __float__": Hyper, "comparable": ComparableHyper}


@pytest.mark.parametrize("kind", HYPER_KINDS.values(), ids=HYPER_KINDS.keys())
@pytest.mark.parametrize("effect", EFFECTS.values(), ids=EFFECTS.keys())
def test_momentum_whose_float_drops_grads_or_params(effect, kind):
    """momentum of the second group is an object whose __float__ drops grads or params (and collects garbage): no
    crash, and the step equals torch's given the state after the code ran (with momentum 0.9 as a float). Armed at
    the first step, where the dropped params (held by nothing else) are freed, and at a later one."""
    shapes = [(37,), (5, 9), (17,), (3, 4, 5), (2, 19), (21,)]
    kept, kept_theirs = leaves(shapes[:2] + shapes[3:])
    torch.manual_seed(1)
    doomed = [torch.randn(shapes[2]), torch.randn(shapes[3])]
    ours_all = kept[:2] + [torch.nn.Parameter(doomed[0].clone()), torch.nn.Parameter(doomed[1].clone())] + kept[2:]
    theirs_all = kept_theirs[:2] + [torch.nn.Parameter(d.clone()) for d in doomed] + kept_theirs[2:]
    # group 1: kept 0, 1 and doomed 0 (last); group 2: doomed 1 (first) and kept 2, 3, 4
    opt = FusedNAG([{"params": ours_all[:3]}, {"params": ours_all[3:], "lr": 0.03}], **HYPER)
    ref = torch.optim.SGD([{"params": theirs_all[:3]}, {"params": theirs_all[3:], "lr": 0.03}], nesterov=True,
                          **HYPER)
    del ours_all  # (the doomed params of ours: held by the param groups only)
    hyper = kind(0.9)
    opt.param_groups[1]["momentum"] = hyper
    for step in range(4):
        for o in (opt, ref):
            params = [p for g in o.param_groups for p in g["params"]]
            give_grads(params, step)
        if step in (0, 2):
            ref_params = [p for g in ref.param_groups for p in g["params"]]
            hyper.effect = lambda: (effect(opt, [p for g in opt.param_groups for p in g["params"]]), gc.collect())
            hyper.armed = True
            effect(ref, ref_params)
        opt.step()
        ref.step()
        assert not hyper.armed
        ours_now = [p for g in opt.param_groups for p in g["params"]]
        theirs_now = [p for g in ref.param_groups for p in g["params"]]
        assert_same(ours_now, theirs_now, opt, ref)
        assert_same(kept, kept_theirs, opt, ref)
        assert len(opt.state) == len(ref.state)


class Refused(Exception):
    pass


@pytest.mark.parametrize("kind", HYPER_KINDS.values(), ids=HYPER_KINDS.keys())
def test_momentum_whose_float_raises(kind):
    """Its error comes out of step() (at every call of __float__), and nothing has changed."""
    def refuse():
        raise Refused("no float today")

    ours, _ = leaves(SHAPES)
    opt = FusedNAG([{"params": ours[:1]}, {"params": ours[1:], "lr": 0.01}], **HYPER)
    for step in range(2):
        give_grads(ours, step)
        opt.step()
    give_grads(ours, 2)
    hyper = kind(0.9, refuse, once=False)
    hyper.armed = True
    opt.param_groups[1]["momentum"] = hyper
    before = snapshot(ours, opt)
    with pytest.raises(Refused, match="no float today"):
        opt.step()
    assert_unchanged(before, ours, opt)


# ---- 3. and 6b. a non-finite grad norm under max_grad_norm skips the step ----

def skipped_then_clipped(spoil, norm_check):
    """Step 0 with spoiled grads (a non-finite norm): skipped, as a reference that does not call step() when the norm
    is not finite. Then finite steps: clip_grads_with_norm_ with FusedNAG's norm, then torch's step."""
    max_norm = 1.0
    ours, theirs = leaves(SHAPES)
    opt = FusedNAG(ours, **HYPER, max_grad_norm=max_norm)
    ref = torch.optim.SGD(theirs, nesterov=True, **HYPER)
    start = [p.detach().clone() for p in ours]
    for params in (ours, theirs):
        give_grads(params, 0)
        spoil(params)
    versions = [p._version for p in ours]
    opt.step()  # (no exception)
    assert not math.isfinite(get_total_norm([p.grad for p in theirs]).item())  # torch: no step
    norm_check(opt.last_grad_norm)
    assert all(same_bits(p, s) for p, s in zip(ours, start, strict=True)), "a skipped step changed a param"
    assert [p._version for p in ours] == [v + 1 for v in versions]  # (written by the kernel, with no change)
    for step in range(1, 4):
        for params in (ours, theirs):
            give_grads(params, step)
        grads = [p.grad.clone() for p in ours]
        opt.step()
        norm = opt.last_grad_norm
        torch.testing.assert_close(norm, get_total_norm(grads), rtol=1e-6, atol=0)
        assert norm.item() > max_norm  # (clipped)
        clip_grads_with_norm_(theirs, max_norm, norm)
        ref.step()
        assert_same(ours, theirs, opt, ref)
        assert all(opt.state[p]["momentum_buffer"].isfinite().all() for p in ours)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_non_finite_grad_on_the_first_clipped_step(bad):
    def spoil(params):
        params[1].grad[2, 3] = bad

    def norm_check(norm):
        assert norm is not None and not norm.isfinite()
        assert norm.isnan().item() == math.isnan(bad)

    skipped_then_clipped(spoil, norm_check)


def test_norm_overflowing_float32_skips_the_step():
    """Grads of 1e30 in float32: the sum of their squares overflows float32 (as torch's float sums do), so the norm
    is inf and the step is skipped, with no exception."""
    def spoil(params):
        for p in params:
            p.grad = torch.full_like(p, 1e30)

    def norm_check(norm):
        assert norm.dtype == torch.float32 and norm.item() == float("inf")

    skipped_then_clipped(spoil, norm_check)


# ---- 4. a kernel that fails in the second op call of a step ----

STEP_OP = torch.ops.nag_cuda.nag_step_.default


@contextlib.contextmanager
def second_op_call_fails():
    """nag_step_ (float lr) on the CPU, with a kernel for AutogradCPU that redispatches below autograd (the real
    kernels: ADInplaceOrView, then CPU) on the first call and raises on the second. Both step paths call the op
    through the dispatcher. Yields the number of params of each call."""
    calls = []

    def kernel(keyset, params, *args, **kwargs):
        calls.append(len(params))
        if len(calls) == 2:
            raise RuntimeError("simulated kernel failure")
        return STEP_OP.redispatch(keyset & torch._C._after_autograd_keyset, params, *args, **kwargs)

    lib = torch.library.Library("nag_cuda", "IMPL")
    try:
        lib.impl("nag_step_", kernel, "AutogradCPU", with_keyset=True)
        yield calls
    finally:
        lib._destroy()


@pytest.mark.parametrize("when", [0, 2], ids=["first step", "later step"])
def test_failure_in_the_second_op_call_steps_the_first_group_once(when):
    """Two groups with different lr: two op calls. The second fails in its kernel: the error says that the step is
    incomplete; the first group was stepped once (torch stepping it alone), the second not at all; later steps go
    on as torch's."""
    ours, theirs = leaves(SHAPES)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.01}]  # noqa: E731
    opt, ref = FusedNAG(groups(ours), **HYPER), torch.optim.SGD(groups(theirs), nesterov=True, **HYPER)
    for step in range(when + 2):
        for params in (ours, theirs):
            give_grads(params, step)
        if step != when:
            opt.step()
            ref.step()
            assert_same(ours, theirs, opt, ref)
            continue
        second = snapshot(ours[2:], opt)
        with second_op_call_fails() as calls, pytest.raises(RuntimeError) as info:
            opt.step()
        assert calls == [2, 1]  # (the first call is group 1's)
        theirs[2].grad = None  # torch stepping group 1 only
        ref.step()
        assert "incomplete" in str(info.value), str(info.value)
        assert_same(ours, theirs, opt, ref)
        assert [p._version for p in ours[2:]] == second["versions"]
        for p, value in zip(ours[2:], second["params"], strict=True):
            assert same_bits(p, value)
        assert (ours[2] in opt.state) == (when > 0)


# ---- 5. lr as a negated view; params appended to a group's list ----

def test_lr_with_the_negation_bit_steps_as_its_value():
    """torch._neg_view(tensor(-0.1)) is 0.1, whose memory holds -0.1. Given at construction, then set in a group."""
    lr = torch._neg_view(torch.tensor(-0.1))
    assert lr.is_neg() and lr.item() == torch.tensor(0.1).item()
    ours, theirs, opt, ref = twins(lr=lr)
    for step in range(5):
        if step == 2:
            for o in (opt, ref):
                o.param_groups[0]["lr"] = torch._neg_view(torch.tensor(-0.05, dtype=torch.float64))
        for params, o in ((ours, opt), (theirs, ref)):
            give_grads(params, step)
            o.step()
        assert_same(ours, theirs, opt, ref)


@pytest.mark.parametrize("when", [0, 3])
def test_param_appended_to_a_group_list(when):
    """opt.param_groups[0]["params"].append(q), bypassing add_param_group: stepped from then on, as torch does."""
    ours, theirs, opt, ref = twins()
    torch.manual_seed(5)
    q = torch.nn.Parameter(torch.randn(3, 7))
    q_theirs = torch.nn.Parameter(q.detach().clone())
    for step in range(6):
        if step == when:
            opt.param_groups[0]["params"].append(q)
            ref.param_groups[0]["params"].append(q_theirs)
        extra = step >= when
        for params, o in ((ours + [q] * extra, opt), (theirs + [q_theirs] * extra, ref)):
            give_grads(params, step)
            o.step()
        assert_same(ours + [q], theirs + [q_theirs], opt, ref)


@pytest.mark.parametrize("case", ["new param twice, first step", "new param twice, later step",
                                  "listed param again"])
def test_param_appended_twice_is_refused(case):
    ours, theirs, opt, ref = twins()
    torch.manual_seed(5)
    q = torch.nn.Parameter(torch.randn(3, 7))
    q_theirs = torch.nn.Parameter(q.detach().clone())
    when = 0 if case.endswith("first step") else 2
    for step in range(when):
        for params, o in ((ours, opt), (theirs, ref)):
            give_grads(params, step)
            o.step()
    new = case.startswith("new")
    for params in (ours + [q], theirs + [q_theirs]):
        give_grads(params, when)
    if new:
        opt.param_groups[0]["params"] += [q, q]
        ref.param_groups[0]["params"].append(q_theirs)
    else:
        opt.param_groups[0]["params"].append(ours[1])
    everything = ours + [q]
    before = snapshot(everything, opt)
    with pytest.raises(ValueError, match="listed twice"):
        opt.step()
    assert_unchanged(before, everything, opt)
    opt.param_groups[0]["params"].pop()  # listed once again: steps as torch's
    opt.step()
    ref.step()
    assert_same(ours + [q] * new, theirs + [q_theirs] * new, opt, ref)


# ---- 6. views as params; float32 overflow of the norm (above); stochastic rounding turned on late ----

def test_interleaved_views_of_one_tensor_step_like_torch():
    """x[0::2] and x[1::2] (and their 2-D kind) share a storage but no element: accepted, and stepped as torch's."""
    torch.manual_seed(0)
    bases = [torch.randn(74), torch.randn(5, 18)]
    bases_theirs = [b.clone() for b in bases]

    def views(b1, b2):
        return [v.requires_grad_() for v in (b1[0::2], b1[1::2], b2[:, 0::2], b2[:, 1::2])]

    ours, theirs = views(*bases), views(*bases_theirs)
    assert all(p.is_leaf for p in ours)
    opt, ref = FusedNAG(ours, **HYPER), torch.optim.SGD(theirs, nesterov=True, **HYPER)
    for step in range(4):
        for params, o in ((ours, opt), (theirs, ref)):
            give_grads(params, step)
            o.step()
        assert_same(ours, theirs, opt, ref)
        assert all(torch.equal(a, b) for a, b in zip(bases, bases_theirs, strict=True))


OVERLAPPING = {
    "slices": lambda x: (x[0:40], x[30:70]),
    "strides 2 and 3": lambda x: (x[0::2], x[0::3]),
    "a column and a row": lambda x: (x.view(2, 37)[:, 0], x.view(2, 37)[0]),
}


@pytest.mark.parametrize("overlap", OVERLAPPING.values(), ids=OVERLAPPING.keys())
def test_overlapping_views_are_refused(overlap):
    a, b = (v.requires_grad_() for v in overlap(torch.randn(74)))
    with pytest.raises(ValueError, match="share memory"):
        FusedNAG([a, b], lr=0.1)
    opt = FusedNAG([a], lr=0.1)
    with pytest.raises(ValueError, match="share memory"):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1


def test_stochastic_rounding_turned_on_after_steps():
    """group["stochastic_rounding"] = True after steps (sr_seed None): the step draws a seed, as add_param_group
    would, and rounds stochastically; no TypeError."""
    params = [torch.nn.Parameter(p.detach().bfloat16()) for p in leaves(SHAPES)[0]]
    opt = FusedNAG(params, lr=0.1)
    group = opt.param_groups[0]
    for step in range(2):
        give_grads(params, step)
        opt.step()
    group["stochastic_rounding"] = True
    assert group["sr_seed"] is None
    seed = None
    for step in range(2, 4):
        give_grads(params, step)
        before = [p.detach().clone() for p in params]
        opt.step()
        assert all(not torch.equal(p, b) and p.isfinite().all() for p, b in zip(params, before, strict=True))
        assert type(group["sr_seed"]) is int and (seed is None or group["sr_seed"] == seed)
        seed = group["sr_seed"]
        assert group["sr_step"] == step - 1


# ---- 7. the ops' own errors; last_grad_norm once clipping is off ----

@pytest.mark.parametrize("meta_first", [False, True], ids=["cpu, meta", "meta, cpu"])
def test_grad_norm_partial_refuses_mixed_devices(meta_first):
    grads = [torch.randn(37), torch.empty(3, device="meta")]
    if meta_first:
        grads.reverse()
    with pytest.raises(RuntimeError, match=r"grad_norm_partial: grads\[1\] is on"):
        torch.ops.nag_cuda.grad_norm_partial(grads, 2.0)


def test_grad_norm_partial_errors_name_it():
    with pytest.raises(RuntimeError, match=r"grad_norm_partial: grads\[1\] has dtype Long") as info:
        torch.ops.nag_cuda.grad_norm_partial([torch.randn(37), torch.ones(5, 9, dtype=torch.int64)], 2.0)
    assert "nag_step_" not in str(info.value)
    # through a clipped step (an int64 tensor may have an int64 grad), after a clipped step: nothing changed
    p = torch.nn.Parameter(torch.randn(37))
    k = torch.zeros(5, 9, dtype=torch.int64)
    opt = FusedNAG([p, k], lr=0.1, max_grad_norm=1.0)
    p.grad = torch.randn(37)
    opt.step()
    p.grad, k.grad = torch.randn(37), torch.ones(5, 9, dtype=torch.int64)
    before = snapshot([p, k], opt)
    with pytest.raises(RuntimeError, match="grad_norm_partial") as info:
        opt.step()
    assert "nag_step_" not in str(info.value)
    assert_unchanged(before, [p, k], opt)


def test_last_grad_norm_is_none_once_clipping_is_turned_off():
    max_norm = 1.0
    ours, theirs = leaves(SHAPES)
    opt = FusedNAG(ours, **HYPER, max_grad_norm=max_norm)
    ref = torch.optim.SGD(theirs, nesterov=True, **HYPER)
    for step in range(4):
        if step == 2:
            opt.max_grad_norm = None
        for params in (ours, theirs):
            give_grads(params, step)
        opt.step()
        if step < 2:
            assert opt.last_grad_norm is not None
            clip_grads_with_norm_(theirs, max_norm, opt.last_grad_norm)
        else:
            assert opt.last_grad_norm is None
        ref.step()
        assert_same(ours, theirs, opt, ref)
