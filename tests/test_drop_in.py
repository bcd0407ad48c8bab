"""The promises of a drop-in for torch.optim.SGD(nesterov=True) at its edges: autograd, signature, named params,
sparse grads, hooks, odd tensors. torch's SGD is the spec each test compares with."""

import copy
import inspect
import os
import subprocess
import sys

import pytest
import torch

from nag_cuda import FusedNAG
from nag_cuda.reference import nag_step_reference
from test_optimizer import assert_unchanged, params_on, snapshot
from test_parity import assert_same_state, make_grads, sgd

pytestmark = pytest.mark.usefixtures("step_path")  # every test on both step paths (conftest.py)

op = torch.ops.nag_cuda.nag_step_.default


def torch_nesterov(params, **kw):
    return torch.optim.SGD(params, nesterov=True, **{"momentum": 0.9, **kw})


# --- autograd: version counters, leaves, inference tensors ----------------------------------------------------------

@pytest.mark.parametrize("make_opt", [FusedNAG, torch_nesterov], ids=["FusedNAG", "torch"])
def test_param_changed_by_step_is_caught_by_backward(make_opt):
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    opt = make_opt(model.parameters(), lr=0.1)
    loss = model(torch.randn(2, 4)).sum()
    loss.backward(retain_graph=True)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_step_bumps_version_counters():
    params = params_on("cpu")
    opt = FusedNAG(params, lr=0.1)
    for p, g in zip(params, make_grads(params, 0), strict=True):
        p.grad = g
    opt.step()
    versions = [(p._version, opt.state[p]["momentum_buffer"]._version, p.grad._version) for p in params]
    opt.step()
    for p, (v_param, v_buf, v_grad) in zip(params, versions, strict=True):
        assert p._version == v_param + 1 and opt.state[p]["momentum_buffer"]._version == v_buf + 1
        assert p.grad._version == v_grad  # grads are written only under GradScaler


def test_op_refuses_leaves_that_require_grad_in_grad_mode():
    p, g, b = torch.randn(5, requires_grad=True), torch.randn(5), torch.zeros(5)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad .* params\\[0\\]"):
        op([p], [g], [b], [True], 0.1, 0.9, 0.0, False)
    lr = torch.tensor(0.1, requires_grad=True)
    with pytest.raises(RuntimeError, match="no derivative, but lr requires grad"):
        torch.ops.nag_cuda.nag_step_.tensor_lr([p.detach()], [g], [b], [True], lr, 0.9, 0.0, False)
    assert torch.equal(p.detach(), before)
    with torch.no_grad():  # as in step()
        op([p], [g], [b], [True], 0.1, 0.9, 0.0, False)
    assert not torch.equal(p.detach(), before)


def test_inference_tensor_is_not_updated_outside_inference_mode():
    p, g = torch.randn(5), torch.randn(5)
    with torch.inference_mode():
        buf = torch.zeros(5)
    before = p.clone()
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        op([p], [g], [buf], [False], 0.1, 0.9, 0.0, False)
    assert torch.equal(p, before) and torch.equal(buf, torch.zeros(5))
    with torch.inference_mode():  # allowed inside, as for torch's in-place ops
        op([p], [g], [buf], [False], 0.1, 0.9, 0.0, False)
    assert not torch.equal(buf, torch.zeros(5))


# --- torch's signature, named params --------------------------------------------------------------------------------

def test_signature_is_torchs():
    ours = inspect.signature(FusedNAG).parameters
    theirs = inspect.signature(torch.optim.SGD).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    for name, param in theirs.items():
        assert ours[name].kind == param.kind, name


def test_renamed_class_and_positional_arguments_give_torchs_numbers():
    a, b = params_on("cpu"), params_on("cpu")
    ours = FusedNAG(a, 0.05, 0.9, 0, 1e-3, True, maximize=True, foreach=False)  # torch's positional order
    theirs = torch.optim.SGD(b, 0.05, 0.9, 0, 1e-3, True, maximize=True, foreach=False)
    for step in range(7):
        for p, q, g in zip(a, b, make_grads(a, step), strict=True):
            p.grad, q.grad = g, g.clone()
        ours.step()
        theirs.step()
    assert_same_state(a, b, ours, theirs)
    assert ours.state_dict()["param_groups"][0].keys() >= theirs.state_dict()["param_groups"][0].keys()


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((0.1, 0.9, 1e-4), {}, ValueError, "dampening=0.0001"),  # weight decay in the old 4th place: loud, not silent
    ((), dict(nesterov=False), ValueError, "nesterov=True"),
    ((), dict(dampening=0.1), ValueError, "dampening=0"),
    ((), dict(differentiable=True), ValueError, "differentiable"),
    ((), dict(fused=True, foreach=True), RuntimeError, "cannot be `True` together"),
])
def test_options_torch_has_but_nesterov_excludes(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        FusedNAG([torch.zeros(3, requires_grad=True)], *args, **kwargs)


def test_named_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    twin = copy.deepcopy(model)
    ours = FusedNAG(model.named_parameters(), lr=0.1, weight_decay=1e-2)
    theirs = torch_nesterov(twin.named_parameters(), lr=0.1, weight_decay=1e-2)
    x = torch.randn(8, 4)
    for _ in range(3):
        for m, o in ((model, ours), (twin, theirs)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    assert ours.state_dict()["param_groups"][0]["param_names"] == theirs.state_dict()["param_groups"][0]["param_names"]
    assert_same_state(list(model.parameters()), list(twin.parameters()), ours, theirs)
    theirs.load_state_dict(ours.state_dict())  # and the other way
    ours.load_state_dict(theirs.state_dict())


def test_named_parameter_groups_and_add_param_group():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    named = list(model.named_parameters())
    opt = FusedNAG([{"params": named[:2]}, {"params": named[2:3], "lr": 0.5}], lr=0.1)
    opt.add_param_group({"params": named[3:], "momentum": 0.5})
    assert [g["param_names"] for g in opt.param_groups] == [["0.weight", "0.bias"], ["1.weight"], ["1.bias"]]
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="all optimizer params should be with/without names"):
        FusedNAG([named[0], model[1].weight])
    with pytest.raises(ValueError, match="all optimizer param groups should be with/without names"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})


# --- sparse gradients -----------------------------------------------------------------------------------------------

def test_sparse_gradients_match_torch():
    emb, lin = torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 2)
    twins = copy.deepcopy((emb, lin))
    ours = FusedNAG([{"params": emb.parameters()}, {"params": lin.parameters(), "weight_decay": 1e-2}], lr=0.1)
    theirs = torch_nesterov([{"params": twins[0].parameters()},
                             {"params": twins[1].parameters(), "weight_decay": 1e-2}], lr=0.1, foreach=False)
    for step in range(5):
        idx = torch.tensor([1, 2, step])
        for (e, l), o in (((emb, lin), ours), (twins, theirs)):
            o.zero_grad()
            l(e(idx)).square().sum().backward()
            o.step()
    assert torch.equal(emb.weight, twins[0].weight) and torch.equal(lin.weight, twins[1].weight)
    buf, buf_torch = ours.state[emb.weight]["momentum_buffer"], theirs.state[twins[0].weight]["momentum_buffer"]
    assert buf.is_sparse and torch.equal(buf.to_dense(), buf_torch.to_dense())


def test_sparse_gradients_under_grad_scaler_match_torch():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    twin = copy.deepcopy(emb)
    ours, theirs = FusedNAG(emb.parameters(), lr=0.1), torch_nesterov(twin.parameters(), lr=0.1, foreach=False)
    scalers = torch.amp.GradScaler("cpu", init_scale=1024.0), torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(4):
        for e, o, s in ((emb, ours, scalers[0]), (twin, theirs, scalers[1])):
            o.zero_grad()
            scale = float("inf") if step == 1 else 1.0  # one skipped step
            s.scale((e(torch.tensor([1, step])) * scale).sum()).backward()
            s.step(o)
            s.update()
    assert torch.equal(emb.weight, twin.weight)


# --- no half-updates across groups ----------------------------------------------------------------------------------

def test_a_failing_last_group_changes_no_group():
    a = params_on("cpu")
    overlapping = torch.zeros(1).expand(6).requires_grad_()  # the kernel refuses to write overlapping memory
    opt = FusedNAG([{"params": a}, {"params": [overlapping], "lr": 0.5}], lr=0.1)
    for p, g in zip(a, make_grads(a, 0), strict=True):
        p.grad = g
    overlapping.grad = torch.ones(6)
    before = snapshot(opt, a)
    with pytest.raises(RuntimeError, match="overlapping memory"):
        opt.step()
    assert_unchanged(before, opt, a)
    assert not opt.state  # no new momentum buffer either


def test_odd_inputs_in_a_second_group_match_torch():
    """What used to fail mid-step in a second group: a bfloat16 tensor lr, conjugate and negative views as grads."""
    gen = torch.Generator().manual_seed(0)
    real = [torch.randn(4099, generator=gen).requires_grad_()]
    cplx = [torch.randn(33, dtype=torch.complex64, generator=gen).requires_grad_()]
    theirs_real, theirs_cplx = [p.detach().clone().requires_grad_() for p in real + cplx]
    groups = lambda r, c: [{"params": r}, {"params": c, "lr": torch.tensor(0.05, dtype=torch.bfloat16)}]  # noqa
    ours, theirs = FusedNAG(groups(real, cplx), lr=0.1), torch_nesterov(groups([theirs_real], [theirs_cplx]), lr=0.1)
    for _ in range(4):
        neg = torch.randn(4099, dtype=torch.complex64, generator=gen).conj().imag  # a negative view
        conj = torch.randn(33, dtype=torch.complex64, generator=gen).conj()
        assert neg.is_neg() and conj.is_conj()
        real[0].grad, theirs_real.grad = neg, neg.clone()
        cplx[0].grad, theirs_cplx.grad = conj, conj.clone()
        ours.step()
        theirs.step()
    assert torch.equal(real[0], theirs_real)
    torch.testing.assert_close(cplx[0], theirs_cplx, rtol=1e-6, atol=1e-6)  # complex add(alpha=): see test_parity


# --- state: hooks, signed zeros, params that move -------------------------------------------------------------------

@pytest.mark.parametrize("master", [False, True])
def test_load_state_dict_keeps_what_hooks_did(master):
    def run(cls, **kw):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3).bfloat16() if master else torch.nn.Linear(4, 3)
        opt = cls(model.parameters(), lr=0.1, **kw)
        model(torch.randn(2, 4, dtype=model.weight.dtype)).float().sum().backward()
        opt.step()
        saved = copy.deepcopy(opt.state_dict())
        opt.register_load_state_dict_pre_hook(lambda o, sd: {**sd, "state": {
            k: {**v, "momentum_buffer": v["momentum_buffer"] * 2} for k, v in sd["state"].items()}})
        opt.register_load_state_dict_post_hook(lambda o: o.state[model.bias]["momentum_buffer"].zero_())
        opt.load_state_dict(saved)
        return saved, opt, model

    saved, ours, model = run(FusedNAG, **(dict(master_weights=True) if master else {}))
    for i, p in enumerate(model.parameters()):
        expected = saved["state"][i]["momentum_buffer"] * (0 if p is model.bias else 2)
        assert torch.equal(ours.state[p]["momentum_buffer"], expected)
        assert ours.state[p]["momentum_buffer"].dtype == (torch.float32 if master else p.dtype)
    if not master:  # the same as torch
        _, theirs, twin = run(torch_nesterov)
        assert_same_state(list(model.parameters()), list(twin.parameters()), ours, theirs)


def _bits(t):
    return t.detach().view(torch.int32)


@pytest.mark.parametrize("zero_start", ["capturable", "grad_scaler"])
def test_zero_started_first_step_keeps_signed_zeros(zero_start):
    """A buffer that starts as zeros (capturable, GradScaler) must give the first step's g exactly, -0.0 included."""
    p = torch.tensor([-0.0, 0.0, -0.0, 1.0], requires_grad=True)
    q = p.detach().clone().requires_grad_()
    ours = FusedNAG([p], lr=0.1, capturable=zero_start == "capturable")
    theirs = torch_nesterov([q], lr=0.1, foreach=False)
    grad = torch.tensor([-0.0, -0.0, 0.0, -0.0])
    p.grad, q.grad = grad.clone(), grad.clone()
    if zero_start == "grad_scaler":
        ours.grad_scale, ours.found_inf = torch.tensor(1.0), torch.tensor(0.0)
    ours.step()
    theirs.step()
    assert torch.equal(_bits(p), _bits(q))
    assert torch.equal(_bits(ours.state[p]["momentum_buffer"]), _bits(theirs.state[q]["momentum_buffer"]))


def test_duplicate_and_overlapping_params_are_refused():
    w = torch.zeros(10, requires_grad=True)
    with pytest.raises(ValueError, match="same parameter twice"):
        FusedNAG([w, w])
    base = torch.zeros(10)
    with pytest.raises(ValueError, match="share memory"):
        FusedNAG([base[:6].requires_grad_(), base[4:].requires_grad_()])
    opt = FusedNAG([base[:5].requires_grad_()])
    with pytest.raises(ValueError, match="share memory"):
        opt.add_param_group({"params": [base[3:8].requires_grad_()]})
    assert len(opt.param_groups) == 1
    FusedNAG([base[:5].requires_grad_(), base[5:].requires_grad_()])  # views that do not overlap are fine


def test_param_converted_mid_run_carries_on():
    """model.double() mid-run: torch's for-loop carries on (its buffer stays float32); FusedNAG converts the
    buffer to the param's new dtype, as load_state_dict does, and carries on."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    twin = copy.deepcopy(model)
    ours, theirs = FusedNAG(model.parameters(), lr=0.1), torch_nesterov(twin.parameters(), lr=0.1, foreach=False)
    x = torch.randn(2, 4)
    for step in range(5):
        if step == 2:
            model.double(), twin.double()
            x = x.double()
        for m, o in ((model, ours), (twin, theirs)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    assert ours.state[model.weight]["momentum_buffer"].dtype == torch.float64
    torch.testing.assert_close(model.weight, twin.weight, rtol=1e-6, atol=1e-6)


# --- the op on meta tensors, the reference with a shape-(1,) lr -----------------------------------------------------

def test_op_on_meta_checks_its_arguments():
    m = torch.empty(5, device="meta")
    with pytest.raises(RuntimeError, match="equal lengths"):
        op([m], [], [], [], 0.1, 0.9, 0.0, False)
    with pytest.raises(RuntimeError, match="momentum_buffers\\[0\\] has shape"):
        op([m], [m], [torch.empty(4, device="meta")], [False], 0.1, 0.9, 0.0, False)
    op([m], [m.clone()], [m.clone()], [False], 0.1, 0.9, 0.0, False)


def test_reference_takes_a_shape_1_tensor_lr():
    params = params_on("cpu")
    grads, bufs = make_grads(params, 0), make_grads(params, 1)
    ref = [[t.detach().clone() for t in ts] for ts in (params, grads, bufs)]
    with torch.no_grad():
        torch.ops.nag_cuda.nag_step_.tensor_lr(params, grads, bufs, [False] * 3, torch.tensor([0.1]), 0.9, 0.0, False)
    nag_step_reference(*ref, [False] * 3, torch.tensor([0.1]), 0.9, 0.0, False)
    for a, b in zip(params + bufs, ref[0] + ref[2], strict=True):
        assert torch.equal(a.detach(), b)


# --- when the bits match torch's ------------------------------------------------------------------------------------

@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_bits_match_torch_at_each_cpu_capability(capability):
    """torch's CPU kernels fuse multiply-adds where its CPU capability has FMA, and round twice at the DEFAULT one
    (x86-64 CPUs without AVX2, or ATEN_CPU_CAPABILITY=default): FusedNAG's CPU kernel follows, so float32 results
    are bit-identical at both (before it did, 353 of these 1000 elements differed at DEFAULT)."""
    code = (
        "import torch\n"
        "from test_parity import run_both\n"
        "ours, theirs, *_ = run_both([(1000,)], torch.float32, 'cpu', lr=0.05, weight_decay=1e-2)\n"
        "print(torch.backends.cpu.get_cpu_capability(), int((ours[0] != theirs[0]).sum()))\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(__file__), env=env).stdout.split()
    if out[0] != capability.upper():
        pytest.skip(f"this CPU runs torch at {out[0]}, not {capability.upper()}")
    assert int(out[1]) == 0
