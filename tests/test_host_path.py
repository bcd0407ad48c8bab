"""The step's C++ stages (csrc/step*.cpp) read grads, tensors, param groups and opt.state afresh at every step. Each
test changes something between steps, as user code may, and compares with torch.optim.SGD(nesterov=True), bit for
bit, after every step: anything remembered from an earlier step that no longer holds (a lookup, a grad, a data
pointer, a setting) fails them (a stale lookup in opt.state can also crash the process, which fails them too)."""

import copy
import gc
import pickle
import sys
import weakref

import numpy as np
import pytest
import torch

import nag_cuda._step
import nag_cuda.optimizer
from nag_cuda import FusedNAG
from nag_cuda._ops import _C

pytestmark = pytest.mark.usefixtures("step_path")  # every test on both step paths (conftest.py)

SHAPES = [(37,), (5, 9), (3, 4, 5)]  # above the SIMD width, with remainders
HYPER = dict(lr=0.1, momentum=0.9, weight_decay=0.01)


@pytest.fixture
def c_path_only(step_path, monkeypatch):
    """On the C++ path, the steps of the test must not be handed to the Python stages (nag_cuda/_step.py)."""
    def refuse(*args, **kwargs):
        raise AssertionError("FusedNAG took the Python path")

    if step_path == "cpp":
        monkeypatch.setattr(nag_cuda._step, "read_groups", refuse)


def twins(shapes=SHAPES, **hyper):
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    hyper = {**HYPER, **hyper}
    return ours, theirs, FusedNAG(ours, **hyper), torch.optim.SGD(theirs, nesterov=True, **hyper)


def give_grads(params, step, skip=()):
    """New grad tensors, as backward() makes after zero_grad(set_to_none=True) (the default); None for `skip`."""
    gen = torch.Generator().manual_seed(step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        p.grad = None if i in skip else grad


def assert_same(ours, theirs, opt, ref):
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.equal(a.detach(), b.detach()), f"param {i}"
        buf, ref_buf = (o.state.get(p, {}).get("momentum_buffer") for o, p in ((opt, a), (ref, b)))
        assert (buf is None) == (ref_buf is None), f"buffer {i}"
        if buf is not None:
            assert torch.equal(buf, ref_buf), f"buffer {i}"


def run(edit, steps=6, skip=lambda step: (), **hyper):
    """Steps both optimizers, calling edit(step, params, optimizer) on each before each step."""
    ours, theirs, opt, ref = twins(**hyper)
    for step in range(steps):
        for params, o in ((ours, opt), (theirs, ref)):
            give_grads(params, step, skip(step))
            edit(step, params, o)
            o.step()
        assert_same(ours, theirs, opt, ref)
    return opt


def at(when, change):
    return lambda step, params, opt: change(params, opt) if step == when else None


def replace_buffer(params, opt):
    opt.state[params[1]]["momentum_buffer"] = torch.full_like(params[1], 0.5)


def swap_buffer_object(params, opt):  # swap_tensors: the buffer's Python object now holds another tensor
    buf = opt.state[params[1]]["momentum_buffer"]
    torch.utils.swap_tensors(buf, torch.linspace(-1, 1, buf.numel()).view(buf.shape))


def swap_buffer_storage(params, opt):  # the same tensor object, other memory: a cached data pointer would be stale
    buf = opt.state[params[0]]["momentum_buffer"]
    buf.set_(torch.linspace(-1, 1, buf.numel()).view(buf.shape))


def replace_param(params, opt):  # another param object in the list's place, with the state moved to it
    group = opt.param_groups[0]["params"]
    params[1] = group[1] = torch.nn.Parameter(params[1].detach().clone())
    params[1].grad = group[1].grad = torch.ones_like(params[1])


def change_hyperparameters(params, opt):
    opt.param_groups[0].update(lr=0.3, momentum=0.5, weight_decay=0.0, maximize=True)


EDITS = {
    "nothing": lambda step, params, opt: None,
    "state entry deleted": at(3, lambda params, opt: opt.state.pop(params[0])),
    "state entry replaced": at(3, lambda params, opt: opt.state.__setitem__(
        params[0], {"momentum_buffer": torch.ones_like(params[0])})),
    "buffer replaced": at(2, replace_buffer),
    "buffer deleted": at(2, lambda params, opt: opt.state[params[1]].pop("momentum_buffer")),
    "buffer set to None": at(2, lambda params, opt: opt.state[params[1]].__setitem__("momentum_buffer", None)),
    "buffer changed in place": at(2, lambda params, opt: opt.state[params[2]]["momentum_buffer"].mul_(-0.5)),
    "buffer storage swapped": at(3, swap_buffer_storage),
    "buffer object swapped": at(3, swap_buffer_object),
    "state dict copied, same buffer": at(2, lambda params, opt: opt.state.__setitem__(params[0],
                                                                                      dict(opt.state[params[0]]))),
    "other state key added": at(2, lambda params, opt: opt.state[params[1]].__setitem__("step", 3)),
    "state dict cleared": at(3, lambda params, opt: opt.state[params[2]].clear()),
    "opt.state cleared": at(3, lambda params, opt: opt.state.clear()),
    "opt.state replaced, same dicts": at(3, lambda params, opt: setattr(opt, "state", type(opt.state)(
        dict, opt.state))),
    "param replaced by its copy": at(3, replace_param),
    "params reordered": at(2, lambda params, opt: opt.param_groups[0]["params"].reverse()),
    "param removed, then back": lambda step, params, opt: opt.param_groups[0].__setitem__(
        "params", params[1:] if step == 2 else list(params)),
    "param .data reassigned": at(2, lambda params, opt: setattr(params[1], "data", torch.linspace(0, 1, 45).view(5, 9))),
    "param changed in place": at(4, lambda params, opt: params[0].detach().add_(1.0)),
    "hyperparameters changed": at(2, change_hyperparameters),
    "lr changed by a scheduler": at(1, lambda params, opt: torch.optim.lr_scheduler.MultiStepLR(opt, [0], 0.5)),
    "param frozen": at(3, lambda params, opt: params[2].requires_grad_(False)),  # its grad still set: still updated
}


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_edit_between_steps_matches_torch(edit, c_path_only):
    run(edit)


@pytest.mark.parametrize("skip", [lambda step: (1,) if step % 2 == 0 else (), lambda step: (2,) if step < 3 else (),
                                  lambda step: (0,) if step >= 3 else ()],
                         ids=["grad None every other step", "grad appears late", "frozen, grad None"])
def test_grads_present_or_not_match_torch(skip, c_path_only):
    run(lambda step, params, opt: None, skip=skip)


def test_state_deleted_while_grad_is_none_matches_torch(c_path_only):
    """A step that looks opt.state up again (it changed) skips params without grads; their last lookups must not
    be reused once they have grads again (here: a deleted state dict and its buffer)."""
    popped = []  # kept alive, so that a stale lookup would find the old dict, unchanged, rather than freed memory
    run(at(2, lambda params, opt: popped.append(opt.state.pop(params[0]))), skip=lambda step: (0,) if step == 2 else ())


def test_buffer_subclass_for_one_step_matches_torch():
    """A buffer the C++ path declines sends one step to the Python path, midway through the C++ path's lookups."""
    class Sub(torch.Tensor):
        pass

    def edit(step, params, opt):
        if step in (2, 3):
            st = opt.state[params[2]]
            st["momentum_buffer"] = st["momentum_buffer"].as_subclass(Sub if step == 2 else torch.Tensor)
        if step == 3:
            opt.state.pop(params[0])

    run(edit)


def test_state_cache_exists_where_dict_watchers_do():
    """The C++ path keeps its opt.state lookups between steps where Python has dict watchers (3.12 on); the edits
    above then run against it (CI runs Python 3.11, 3.12 and 3.13)."""
    cache = FusedNAG([torch.nn.Parameter(torch.ones(3))])._state_cache
    assert (cache is not None) == (sys.version_info >= (3, 12))


def test_old_state_is_freed_after_load_state_dict(c_path_only):
    """The cache of opt.state lookups does not keep a replaced opt.state (and its buffers) alive."""
    ours, _, opt, _ = twins()
    give_grads(ours, 0)
    opt.step()
    old_buf = weakref.ref(opt.state[ours[0]]["momentum_buffer"])
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    gc.collect()
    assert old_buf() is None


def test_add_param_group_mid_run_matches_torch(c_path_only):
    ours, theirs, opt, ref = twins()
    extra = [torch.nn.Parameter(torch.randn(11)) for _ in range(2)]
    extra[1].data.copy_(extra[0].detach())
    for step in range(5):
        if step == 2:
            opt.add_param_group({"params": [extra[0]], "lr": 0.05})
            ref.add_param_group({"params": [extra[1]], "lr": 0.05})
        for params, o in ((ours + extra[:1] * (step >= 2), opt), (theirs + extra[1:] * (step >= 2), ref)):
            give_grads(params, step)
            o.step()
        assert_same(ours + extra[:1], theirs + extra[1:], opt, ref)


def test_groups_sharing_a_call_then_one_changes_a_setting(c_path_only):
    """Groups with equal settings share one op call; a group whose lr, momentum, weight decay or maximize changes
    leaves it at the next step."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = FusedNAG([{"params": [p]} for p in ours], **HYPER)
    ref = torch.optim.SGD([{"params": [p]} for p in theirs], nesterov=True, **HYPER)
    # the last group, each step from the next on, differs from the others in one setting
    changes = {2: dict(momentum=0.5), 3: dict(momentum=0.9, weight_decay=0.1),
               4: dict(weight_decay=0.01, maximize=True), 5: dict(maximize=False, lr=0.02)}
    for step in range(7):
        for params, o in ((ours, opt), (theirs, ref)):
            give_grads(params, step)
            o.param_groups[2].update(changes.get(step, {}))
            o.step()
        assert_same(ours, theirs, opt, ref)


# Param-group values that _C._step reads itself (csrc/step_read_groups.cpp), each in the second of two groups.
GROUP_VALUES = {
    "ints": dict(lr=1, momentum=1, weight_decay=0),
    "numpy scalars": dict(lr=np.float64(0.05), momentum=np.float32(0.8), weight_decay=np.float32(1e-3)),
    "tensor lr": dict(lr=torch.tensor(0.05)),
    "tensor momentum and weight_decay": dict(momentum=torch.tensor(0.8), weight_decay=torch.tensor(1e-3)),
    "maximize as an int, dampening as a float": dict(maximize=1, dampening=0.0),
    "NaN lr": dict(lr=float("nan")),
}


@pytest.mark.parametrize("values", GROUP_VALUES.values(), ids=GROUP_VALUES.keys())
def test_group_values_read_in_cpp_match_torch(values, c_path_only):
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = FusedNAG([{"params": ours[:1]}, {"params": ours[1:], **values}], **HYPER)
    ref = torch.optim.SGD([{"params": theirs[:1]}, {"params": theirs[1:], **values}], nesterov=True, **HYPER)
    for step in range(4):
        for params, o in ((ours, opt), (theirs, ref)):
            give_grads(params, step)
            o.step()
        for a, b in zip(ours, theirs, strict=True):  # (NaN == NaN here)
            assert torch.equal(a.detach().nan_to_num(), b.detach().nan_to_num())
            assert a.isnan().equal(b.isnan())


def test_tensor_lr_is_not_read_on_the_host(c_path_only):
    """A tensor lr is read by the kernel on the device, never by the step on the host (which would synchronise a
    CUDA step with the host, and fail in a CUDA graph's capture)."""
    class Unreadable(torch.Tensor):
        def __float__(self):
            raise AssertionError("the step read the tensor lr on the host")

        __bool__ = __index__ = item = __float__

    def unreadable_lr(step, params, opt):
        if step == 0 and isinstance(opt, FusedNAG):
            opt.param_groups[0]["lr"] = torch.tensor(0.05).as_subclass(Unreadable)

    run(unreadable_lr, steps=3, lr=torch.tensor(0.05))


def test_group_without_keys_that_torch_sgd_may_lack(c_path_only):
    """nesterov, dampening and differentiable default as _rules.check_group's group.get() defaults them."""
    def drop_keys(step, params, opt):
        if step == 0 and isinstance(opt, FusedNAG):
            for key in ("nesterov", "dampening", "differentiable"):
                del opt.param_groups[0][key]

    run(drop_keys, steps=3)


def test_stochastic_rounding_keys_of_cpp_and_python_paths_agree(monkeypatch):
    """_C._step derives each group's random key from sr_seed, sr_step and the group's index as FusedNAG._groups does
    (modulo 2**63): the C++ and the Python path round alike, with seeds of any sign and size, over many steps."""
    seeds, steps = [-5, 7, 2**62 + 12345, 3**50], [0, 1, 2**40 + 3, 5]
    results = []
    for python_path in (False, True):
        with monkeypatch.context() as m:
            if python_path:
                m.setattr(nag_cuda._step, "CPP_STEP", False)
            torch.manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(37, dtype=torch.bfloat16)) for _ in seeds]
            start = [p.detach().clone() for p in params]
            opt = FusedNAG([{"params": [p], "sr_seed": seed} for p, seed in zip(params, seeds, strict=True)],
                           lr=0.01, stochastic_rounding=True)
            for group, step in zip(opt.param_groups, steps, strict=True):
                group["sr_step"] = step
            for step in range(3):
                give_grads(params, step)
                opt.step()
            results.append([p.detach().clone() for p in params])
    for a, b, before in zip(*results, start, strict=True):
        assert torch.equal(a, b) and not torch.equal(a, before)


def test_load_state_dict_mid_run_matches_torch(c_path_only):
    saved = {}

    def edit(step, params, opt):
        if step == 1:
            saved[id(opt)] = copy.deepcopy(opt.state_dict())
        if step == 4:
            opt.load_state_dict(saved[id(opt)])

    run(edit)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))], ids=["deepcopy", "pickle"])
def test_copied_optimizer_steps_its_own_params(clone, c_path_only):
    ours, theirs, opt, ref = twins()
    for step in range(2):
        for params, o in ((ours, opt), (theirs, ref)):
            give_grads(params, step)
            o.step()
    opt, ref = clone(opt), clone(ref)
    ours, theirs = opt.param_groups[0]["params"], ref.param_groups[0]["params"]
    for step in range(2, 5):
        for params, o in ((ours, opt), (theirs, ref)):
            give_grads(params, step)
            o.step()
        assert_same(ours, theirs, opt, ref)


def test_param_moved_to_another_dtype_matches_torch():
    """The C++ path refuses the float32 buffer of a param now float64; the careful Python path converts it, as
    load_state_dict would, and the steps go on as torch's."""
    def edit(step, params, opt):
        if step >= 2:
            params[0].data = params[0].data.double() if step == 2 else params[0].data
            params[0].grad = params[0].grad.double()

    ours, theirs, opt, ref = twins()
    for step in range(5):
        for params, o in ((ours, opt), (theirs, ref)):
            give_grads(params, step)
            edit(step, params, o)
            if step >= 2 and o is ref:  # torch casts state on load only; do what FusedNAG's careful path does
                st = o.state[params[0]]
                st["momentum_buffer"] = st["momentum_buffer"].double()
            o.step()
        assert_same(ours, theirs, opt, ref)
    assert opt.state[ours[0]]["momentum_buffer"].dtype == torch.float64


def test_large_step_without_the_gil_matches_torch(c_path_only):
    """Steps over 2^20 elements release the GIL around the op and hold their tensors by owned handles."""
    ours, theirs, opt, ref = twins(shapes=[(1 << 20,), (333,)])
    for step in range(3):
        for params, o in ((ours, opt), (theirs, ref)):
            give_grads(params, step)
            o.step()
        assert_same(ours, theirs, opt, ref)


def test_bad_buffer_in_a_later_group_changes_nothing(c_path_only):
    """The C++ path checks every call before the first one writes."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = FusedNAG([{"params": params[:2]}, {"params": params[2:], "lr": 0.01}], **{**HYPER, "lr": 0.1})
    give_grads(params, 0)
    opt.step()
    opt.state[params[2]]["momentum_buffer"] = torch.zeros(7)
    before = [p.detach().clone() for p in params], [opt.state[p]["momentum_buffer"].clone() for p in params[:2]]
    versions = [p._version for p in params]
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\] has shape \[7\]"):  # (the second call's first)
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before[0], strict=True))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(params[:2], before[1], strict=True))
    assert [p._version for p in params] == versions


def test_c_path_declines_what_python_handles():
    """Sparse grads and tensor subclasses go to the Python path, with nothing changed by the C++ one."""
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = FusedNAG(emb.parameters(), lr=0.1)
    assert _C._step(opt.param_groups, opt.state, None, None, None) is False

    class Sub(torch.Tensor):
        pass

    p = torch.nn.Parameter(torch.randn(5)).as_subclass(Sub)
    p.grad = torch.randn(5)
    group = {**FusedNAG([torch.randn(5)]).param_groups[0], "params": [p]}
    assert _C._step([group], {}, None, None, None) is False
    assert nag_cuda._step._C is _C
