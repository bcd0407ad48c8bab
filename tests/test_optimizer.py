"""FusedNAG as a torch.optim.Optimizer: state dicts, checkpoints, schedulers, closures, hooks, bad input."""

import copy
import io
import pickle

import pytest
import torch

from nag_cuda import FusedNAG
from test_parity import assert_same_state, make_grads, make_params, sgd

pytestmark = pytest.mark.usefixtures("step_path")  # every test on both step paths (conftest.py)

SHAPES = [(4099,), (33, 17), (5,)]
HYPER = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)


def params_on(device, dtype=torch.float32):
    return [p.requires_grad_() for p in make_params(SHAPES, dtype, device)]


def step_with(opt, params, step):
    for p, g in zip(params, make_grads(params, step), strict=True):
        p.grad = g
    opt.step()


def snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_unchanged(before, opt, params):
    old_params, old_state = before
    for p, q in zip(params, old_params, strict=True):
        assert torch.equal(p, q)
    new_state = opt.state_dict()
    assert new_state["state"].keys() == old_state["state"].keys()
    for k, s in old_state["state"].items():
        assert torch.equal(new_state["state"][k]["momentum_buffer"], s["momentum_buffer"])
    assert new_state["param_groups"] == old_state["param_groups"]


@pytest.mark.parametrize("direction", ["fusednag_to_sgd", "sgd_to_fusednag"])
def test_state_dict_loads_both_ways(device, direction):
    a, b = params_on(device), params_on(device)
    first, second = (FusedNAG, sgd) if direction == "fusednag_to_sgd" else (sgd, FusedNAG)
    opt_a = first(a, **HYPER)
    for step in range(3):
        step_with(opt_a, a, step)
    with torch.no_grad():
        for p, q in zip(a, b, strict=True):
            q.copy_(p)
    opt_b = second(b, **HYPER)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as from a file: no shared buffers
    assert opt_b.state_dict()["param_groups"][0]["nesterov"] is True
    for step in range(3, 7):
        step_with(opt_a, a, step)
        step_with(opt_b, b, step)
    assert_same_state(a, b, opt_a, opt_b) if first is FusedNAG else assert_same_state(b, a, opt_b, opt_a)


def test_state_dict_layout_matches_sgd(device):
    a, b = params_on(device), params_on(device)
    ours, theirs = FusedNAG(a, **HYPER), sgd(b, **HYPER)
    step_with(ours, a, 0)
    step_with(theirs, b, 0)
    s_ours, s_theirs = ours.state_dict(), theirs.state_dict()
    assert s_ours["state"].keys() == s_theirs["state"].keys()
    for k in s_ours["state"]:
        assert s_ours["state"][k].keys() == s_theirs["state"][k].keys() == {"momentum_buffer"}
    for key in ("lr", "momentum", "weight_decay", "nesterov", "dampening", "maximize", "params"):
        assert s_ours["param_groups"][0][key] == s_theirs["param_groups"][0][key]


def test_checkpoint_resume_is_exact(device):
    straight = params_on(device)
    opt = FusedNAG(straight, **HYPER)
    for step in range(7):
        step_with(opt, straight, step)

    first = params_on(device)
    opt = FusedNAG(first, **HYPER)
    for step in range(3):
        step_with(opt, first, step)
    blob = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt.state_dict()}, blob)
    blob.seek(0)
    ckpt = torch.load(blob)
    resumed = [p.clone().requires_grad_() for p in ckpt["params"]]
    opt = FusedNAG(resumed, **HYPER)
    opt.load_state_dict(ckpt["opt"])
    for step in range(3, 7):
        step_with(opt, resumed, step)
    for p, q in zip(resumed, straight, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("make_scheduler", [
    lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=7),  # cycles momentum too
], ids=["StepLR", "OneCycleLR"])
def test_schedulers(device, make_scheduler):
    a, b = params_on(device), params_on(device)
    ours, theirs = FusedNAG(a, **HYPER), sgd(b, **HYPER)
    sched_ours, sched_theirs = make_scheduler(ours), make_scheduler(theirs)
    for step in range(7):
        step_with(ours, a, step)
        step_with(theirs, b, step)
        sched_ours.step()
        sched_theirs.step()
        assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
        assert ours.param_groups[0]["momentum"] == theirs.param_groups[0]["momentum"]
    assert_same_state(a, b, ours, theirs)


def test_closure_zero_grad_and_hooks():
    model = torch.nn.Linear(5, 3)
    opt = FusedNAG(model.parameters(), lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    x = torch.randn(8, 5)

    def closure():
        opt.zero_grad()
        assert torch.is_grad_enabled()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    before = model.weight.detach().clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]
    assert not torch.equal(model.weight, before)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_pickle_and_deepcopy():
    params = params_on("cpu")
    opt = FusedNAG(params, **HYPER)
    step_with(opt, params, 0)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert all(clone.defaults[k] == v for k, v in opt.defaults.items())
        state, cloned_state = opt.state_dict()["state"], clone.state_dict()["state"]
        for k in state:
            assert torch.equal(state[k]["momentum_buffer"], cloned_state[k]["momentum_buffer"])


def test_add_param_group_and_params_without_grad():
    a = params_on("cpu")
    opt = FusedNAG(a[:2], **HYPER)
    opt.add_param_group({"params": [a[2]], "lr": 0.5})
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["nesterov"] is True
    a[0].grad = torch.ones_like(a[0])
    opt.step()
    assert list(opt.state) == [a[0]]  # params with grad None get no state


def test_repr_and_defaults():
    opt = FusedNAG([torch.zeros(1, requires_grad=True)])
    assert opt.defaults == dict(lr=1e-3, momentum=0.9, dampening=0, weight_decay=0.0, nesterov=True, maximize=False,
                                foreach=None, differentiable=False, fused=None, capturable=False,
                                momentum_dtype=None, master_weights=False, stochastic_rounding=False, sr_seed=None)
    assert "FusedNAG" in repr(opt)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-0.1), "learning rate"),
    (dict(momentum=0.0), "momentum"),
    (dict(momentum=-0.5), "momentum"),
    (dict(weight_decay=-1e-4), "weight_decay"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedNAG([torch.zeros(3, requires_grad=True)], **kwargs)


def test_bad_hyperparameter_types():
    with pytest.raises(TypeError, match="lr"):
        FusedNAG([torch.zeros(3, requires_grad=True)], lr="0.1")
    with pytest.raises(ValueError, match="1-element"):
        FusedNAG([torch.zeros(3, requires_grad=True)], lr=torch.tensor([0.1, 0.2]))


def test_empty_parameter_list():
    with pytest.raises(ValueError, match="empty parameter list"):
        FusedNAG([])


def test_bad_param_group_is_rejected_before_joining():
    a = params_on("cpu")
    opt = FusedNAG(a[:2], **HYPER)
    with pytest.raises(ValueError, match="learning rate"):
        opt.add_param_group({"params": [a[2]], "lr": -1.0})
    assert len(opt.param_groups) == 1


def test_sparse_gradient_with_weight_decay_changes_nothing():
    """torch's SGD cannot step a sparse gradient with weight decay (add(sparse, dense)); FusedNAG says so before any
    group moves."""
    dense = params_on("cpu")
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = FusedNAG([{"params": dense}, {"params": emb.parameters()}], **HYPER)
    step_with(opt, dense, 0)
    emb(torch.tensor([1, 2])).sum().backward()
    for p, g in zip(dense, make_grads(dense, 1), strict=True):
        p.grad = g
    before = snapshot(opt, dense)
    emb_before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradient needs weight_decay=0"):
        opt.step()
    assert_unchanged(before, opt, dense)
    assert torch.equal(emb.weight, emb_before) and emb.weight not in opt.state


# Values that make a param group invalid after construction (e.g. a non-Nesterov SGD state dict, a typo), and the
# error that _rules.check_group raises for them at the step (the C++ step leaves such groups to it).
BAD_GROUPS = {
    "nesterov=False": (dict(nesterov=False), ValueError, "nesterov=True"),
    "momentum=0": (dict(momentum=0.0), ValueError, "momentum"),
    "negative lr": (dict(lr=-0.1), ValueError, "Invalid learning rate"),
    "negative weight_decay": (dict(weight_decay=-1e-4), ValueError, "Invalid weight_decay"),
    "dampening": (dict(dampening=0.1), ValueError, "dampening=0"),
    "differentiable": (dict(differentiable=True), ValueError, "differentiable"),
    "lr as a string": (dict(lr="0.1"), TypeError, "lr must be a real number"),
    "momentum as a list": (dict(momentum=[0.9]), TypeError, "momentum must be a real number"),
    "capturable with a tensor momentum": (dict(capturable=True, momentum=torch.tensor(0.9)), ValueError,
                                          "capturable=True needs momentum"),
}


@pytest.mark.parametrize("values, error, match", BAD_GROUPS.values(), ids=BAD_GROUPS.keys())
def test_invalid_group_changes_nothing(values, error, match):
    """A group made invalid after construction fails before any update, in any group."""
    a = params_on("cpu")
    opt = FusedNAG([{"params": a[:2]}, {"params": a[2:]}], **HYPER)
    step_with(opt, a, 0)
    for p, g in zip(a, make_grads(a, 1), strict=True):
        p.grad = g
    opt.param_groups[1].update(values)
    before = snapshot(opt, a)
    with pytest.raises(error, match=match):
        opt.step()
    assert_unchanged(before, opt, a)


def test_trains_a_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = FusedNAG(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(256, 10)
    y = x[:, :1] * 2 - x[:, 1:2]
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]


def test_mismatched_momentum_buffer_changes_nothing():
    """A state dict from another model (wrong buffer shape in the last group) fails before the first group moves."""
    a = params_on("cpu")
    opt = FusedNAG([{"params": a[:2]}, {"params": a[2:]}], **HYPER)
    step_with(opt, a, 0)
    state = copy.deepcopy(opt.state_dict())
    state["state"][2]["momentum_buffer"] = torch.zeros(6)
    opt.load_state_dict(state)
    for p, g in zip(a, make_grads(a, 1), strict=True):
        p.grad = g
    before = snapshot(opt, a)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[\d+\] has shape"):
        opt.step()
    assert_unchanged(before, opt, a)
