"""FusedNAG(max_grad_norm=...): the step equals torch.nn.utils.clip_grad_norm_ followed by the step, with the norm
reduced by nag_cuda's kernel and the grads multiplied as the step reads them."""
import copy
import pickle

import pytest
import torch
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from conftest import LOW_PRECISION, requires_cuda_kernel
import nag_cuda._step
from nag_cuda import FusedNAG
from nag_cuda._ops import ops
from test_parity import SHAPES, make_grads, make_params, sgd

pytestmark = pytest.mark.usefixtures("step_path")  # every test on both step paths (conftest.py)

HYPER = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
STEPS = 5


def pair(dtype, device, groups=False, **clip):
    ours = [p.requires_grad_() for p in make_params(SHAPES, dtype, device)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    split = (lambda ps: [dict(params=ps[:3]), dict(params=ps[3:], lr=0.03)]) if groups else (lambda ps: ps)
    opt_ours = FusedNAG(split(ours), **HYPER, **clip)
    # torch's SGD where it rounds as FusedNAG does (float32, float64); else FusedNAG without clipping
    opt_theirs = FusedNAG(split(theirs), **HYPER) if dtype in LOW_PRECISION else sgd(split(theirs), **HYPER)
    return ours, theirs, opt_ours, opt_theirs


def set_grads(ours, theirs, step, scale=1.0):
    for p, q, g in zip(ours, theirs, make_grads(ours, step), strict=True):
        p.grad, q.grad = g * scale, g * scale


def assert_same(ours, theirs, opt_ours, opt_theirs):
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(p, q)
        if q in opt_theirs.state:
            assert torch.equal(opt_ours.state[p]["momentum_buffer"], opt_theirs.state[q]["momentum_buffer"])


@pytest.mark.parametrize("groups", [False, True], ids=["one-group", "two-groups"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf"), 3.0])
def test_equals_clip_grad_norm_then_step(device, dtype, norm_type, groups):
    """Bit for bit what clip_grad_norm_ with the same norm gives, then the step, for every dtype, across groups;
    the norm itself agrees with torch's get_total_norm up to the order of the sums."""
    first = [g.double() for g in make_grads(make_params(SHAPES, dtype, device), 0) if g.numel()]
    first = get_total_norm(first, norm_type)  # (torch's inf norm of an empty tensor fails: left out, as ours skips it)
    max_norm = 1.5 * first.item()  # the first step is not clipped, the others are (their grads are larger)
    ours, theirs, opt_ours, opt_theirs = pair(dtype, device, groups, max_grad_norm=max_norm, norm_type=norm_type)
    for step in range(STEPS):
        set_grads(ours, theirs, step, scale=step + 1)
        grads = [p.grad.clone() for p in ours]
        opt_ours.step()
        norm = opt_ours.last_grad_norm
        assert norm.dtype == torch.float32 and norm.shape == () and norm.device.type == device
        expected = get_total_norm([g.double() for g in grads if g.numel()], norm_type)
        torch.testing.assert_close(norm.double(), expected, rtol=1e-5 if dtype in LOW_PRECISION else 1e-6, atol=0)
        assert (norm.item() > max_norm) == (step > 0)
        clip_grads_with_norm_(theirs, max_norm, norm)
        opt_theirs.step()
        assert_same(ours, theirs, opt_ours, opt_theirs)
        assert all(torch.equal(p.grad, g) for p, g in zip(ours, grads, strict=True))  # left unclipped


def test_no_clipping_is_exactly_torch(device):
    """A norm under max_grad_norm changes nothing: torch's SGD without clipping, bit for bit."""
    ours, theirs, opt_ours, opt_theirs = pair(torch.float32, device, max_grad_norm=1e6)
    for step in range(STEPS):
        set_grads(ours, theirs, step)
        opt_ours.step()
        opt_theirs.step()
        assert_same(ours, theirs, opt_ours, opt_theirs)


def test_python_path_gives_the_same_bits(device, monkeypatch):
    """The Python step (DTensors, torch.compile) clips as the C++ step does."""
    runs = []
    for python in (False, True):
        ours, theirs, opt, _ = pair(torch.float32, device, groups=True, max_grad_norm=0.3)
        monkeypatch.setattr(nag_cuda._step, "CPP_STEP", not python)
        for step in range(3):
            set_grads(ours, theirs, step)
            opt.step()
        runs.append((ours, opt.last_grad_norm))
    assert torch.equal(runs[0][1], runs[1][1])
    assert all(torch.equal(p, q) for p, q in zip(runs[0][0], runs[1][0], strict=True))


def test_compiled_step():
    """torch.compile(opt.step, fullgraph=True) with clipping: one graph, the eager step's numbers. (On CPU, where the
    norm is a 0-dim CPU tensor, inductor compiles the coefficient's scalar arithmetic itself, and its sqrt may round
    the other way: the step is then what clip_grad_norm_ with that norm gives.)"""
    ours, theirs, opt_ours, opt_theirs = pair(torch.float32, "cpu", max_grad_norm=0.3)
    step = torch.compile(opt_ours.step, fullgraph=True)
    for i in range(3):
        set_grads(ours, theirs, i)
        grads = [p.grad.clone() for p in ours]
        step()
        torch.testing.assert_close(opt_ours.last_grad_norm, get_total_norm([g for g in grads if g.numel()]),
                                   rtol=1e-6, atol=0)
        clip_grads_with_norm_(theirs, 0.3, opt_ours.last_grad_norm)
        opt_theirs.step()
        for p, q in zip(ours, theirs, strict=True):
            torch.testing.assert_close(p, q, rtol=2**-22, atol=0)  # (within the coefficient's last bit)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_norm_skips_the_step(device, bad):
    ours, theirs, opt, _ = pair(torch.float32, device, max_grad_norm=1.0)
    set_grads(ours, theirs, 0)
    opt.step()
    before = [p.detach().clone() for p in ours], [opt.state[p]["momentum_buffer"].clone() for p in ours[1:]]
    set_grads(ours, theirs, 1)
    ours[-1].grad[7] = bad
    opt.step()
    assert not opt.last_grad_norm.isfinite()
    assert all(torch.equal(p, b) for p, b in zip(ours, before[0], strict=True))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(ours[1:], before[1], strict=True))


def test_grad_scaler(device):
    """Under GradScaler the norm is of the unscaled grads and the step equals unscale_, clip, step; an overflow
    skips the step as before."""
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(37, 300), torch.nn.Tanh(), torch.nn.Linear(300, 5)).to(device)
    theirs = copy.deepcopy(ours)
    opt_ours = FusedNAG(ours.parameters(), **HYPER, max_grad_norm=0.1)
    opt_theirs = sgd(theirs.parameters(), **HYPER)
    scalers = [torch.amp.GradScaler(device, init_scale=2.0**12) for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        x, y = torch.randn(16, 37, generator=gen).to(device), torch.randn(16, 5, generator=gen).to(device)
        for model, opt, scaler in ((ours, opt_ours, scalers[0]), (theirs, opt_theirs, scalers[1])):
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            if step == 3:
                next(model.parameters()).grad.view(-1)[3] = float("inf")
            if opt is opt_theirs:
                scaler.unscale_(opt)
                unscaled = get_total_norm([p.grad for p in theirs.parameters()])
                if step != 3:
                    torch.testing.assert_close(opt_ours.last_grad_norm, unscaled, rtol=1e-6, atol=0)
                    assert opt_ours.last_grad_norm > 0.1  # clipped
                clip_grads_with_norm_(theirs.parameters(), 0.1, opt_ours.last_grad_norm)
            scaler.step(opt)
            scaler.update()
        for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
            assert torch.equal(p, q)
        assert scalers[0].get_scale() == scalers[1].get_scale()
    assert scalers[0].get_scale() < 2.0**12  # the overflow backed the scale off


def test_global_norm_skips_params_without_grads(device):
    ps = [torch.nn.Parameter(torch.full((3,), 2.0, device=device)) for _ in range(3)]
    opt = FusedNAG([dict(params=ps[:1]), dict(params=ps[1:])], lr=0.1, max_grad_norm=1.0)
    assert opt.last_grad_norm is None
    opt.step()  # no grads at all: the norm is 0, as clip_grad_norm_ returns, and nothing moves
    assert opt.last_grad_norm.item() == 0.0 and all((p == 2).all() for p in ps)
    ps[0].grad = torch.full((3,), 3.0, device=device)
    ps[2].grad = torch.full((3,), 4.0, device=device)
    opt.step()
    assert opt.last_grad_norm.item() == pytest.approx(5 * 3**0.5)


def test_sparse_grads_are_refused_before_anything_changes():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    dense = torch.nn.Parameter(torch.ones(4))
    opt = FusedNAG([dict(params=[dense]), dict(params=emb.parameters())], lr=0.1, max_grad_norm=1.0)
    emb(torch.tensor([1, 2])).sum().backward()
    dense.grad = torch.ones(4)
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="max_grad_norm does not support sparse"):
        opt.step()
    assert torch.equal(emb.weight, before) and torch.equal(dense, torch.ones(4)) and not opt.state


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
    (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm"),
    (dict(max_grad_norm=float("nan")), ValueError, "max_grad_norm"),
    (dict(max_grad_norm="1.0"), TypeError, "max_grad_norm"),
    (dict(max_grad_norm=True), TypeError, "max_grad_norm"),
    (dict(max_grad_norm=1.0, norm_type=0.0), ValueError, "norm_type"),
    (dict(max_grad_norm=1.0, norm_type=-2.0), ValueError, "norm_type"),
    (dict(max_grad_norm=1.0, norm_type=float("nan")), ValueError, "norm_type"),
    (dict(max_grad_norm=1.0, norm_type="fro"), TypeError, "norm_type"),
])
def test_bad_input_fails_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        FusedNAG([torch.nn.Parameter(torch.ones(2))], lr=0.1, **kwargs)


@pytest.mark.parametrize("attribute, value, error", [("max_grad_norm", -1.0, ValueError),
                                                     ("max_grad_norm", "1", TypeError),
                                                     ("norm_type", 0.0, ValueError)])
def test_bad_setting_made_later_fails_before_anything_changes(attribute, value, error):
    ps = [torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(3))]
    opt = FusedNAG([dict(params=ps[:1]), dict(params=ps[1:], lr=0.2)], lr=0.1, max_grad_norm=1.0)
    for p in ps:
        p.grad = torch.ones_like(p)
    setattr(opt, attribute, value)
    with pytest.raises(error, match=attribute):
        opt.step()
    assert all(torch.equal(p, torch.ones_like(p)) for p in ps) and not opt.state and opt.last_grad_norm is None


def test_copies_keep_the_setting():
    p = torch.nn.Parameter(torch.ones(5))
    opt = FusedNAG([p], lr=0.1, max_grad_norm=0.25, norm_type=1.0)
    p.grad = torch.ones(5)
    opt.step()
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert (copied.max_grad_norm, copied.norm_type) == (0.25, 1.0)
        assert copied.last_grad_norm is None  # a per-step result, not state
    fresh = FusedNAG([p], lr=0.1, max_grad_norm=0.25, norm_type=1.0)
    fresh.load_state_dict(opt.state_dict())
    assert torch.equal(fresh.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])


def test_ops_pass_opcheck():
    grads = [torch.randn(40), torch.randn(3, 5), torch.randn(0)]
    torch.library.opcheck(ops.grad_norm_partial, (grads, 2.0), dict(grad_scale=torch.tensor(4.0)))
    p, g, b = torch.randn(20), torch.randn(20), torch.randn(20)
    torch.library.opcheck(ops.nag_step_.default, ([p], [g], [b], [False], 0.1, 0.9, 0.0, False),
                          dict(grad_coef=torch.tensor(0.5)))


@requires_cuda_kernel
def test_no_host_synchronisation_on_cuda():
    """The norm, the coefficient and the clipped step stay on the device, under GradScaler too."""
    ours, theirs, opt, _ = pair(torch.float32, "cuda", max_grad_norm=0.5)
    set_grads(ours, theirs, 0)
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 3):
            set_grads(ours, theirs, step)
            opt.step()
        opt.grad_scale, opt.found_inf = torch.full((), 4.0, device="cuda"), torch.zeros((), device="cuda")
        opt.step()  # (as GradScaler.step() calls it)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        opt.grad_scale = opt.found_inf = None
    assert opt.last_grad_norm.device.type == "cuda"
