"""FusedNAG against torch.optim.SGD(nesterov=True): same parameters and momentum buffers, step after step."""

import pytest
import torch

from conftest import LOW_PRECISION, low_precision_tol, requires_cuda_kernel
from nag_cuda import FusedNAG

pytestmark = pytest.mark.usefixtures("step_path")  # every test on both step paths (conftest.py)

STEPS = 7
# 0, 1, 0-dim, odd, above every SIMD width with a remainder, several kernel chunks (16384 elements) plus a tail.
SHAPES = [(0,), (1,), (), (7,), (33, 17), (4099,), (3, 64, 65), (2 * 16384 + 5,)]


def make_params(shapes, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device) for s in shapes]


def make_grads(params, step, seed=1):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype=p.dtype, device=p.device)
            for p in params]


def sgd(params, **kw):
    kw.setdefault("momentum", 0.9)
    return torch.optim.SGD(params, nesterov=True, foreach=False, **kw)


def assert_same_state(ours, theirs, opt_ours, opt_theirs, **tol):
    """Params and momentum buffers equal: bit for bit unless a tolerance is given (FusedNAG rounds where torch's
    per-tensor SGD rounds, so float32 and float64 match exactly)."""
    tol = tol or dict(rtol=0, atol=0)
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, **tol)
        if q in opt_theirs.state and "momentum_buffer" in opt_theirs.state[q]:
            torch.testing.assert_close(opt_ours.state[p]["momentum_buffer"],
                                       opt_theirs.state[q]["momentum_buffer"], **tol)
        else:
            assert "momentum_buffer" not in opt_ours.state.get(p, {})


def run_both(shapes, dtype, device, steps=STEPS, groups=None, **hyper):
    """Steps FusedNAG and torch SGD on identical copies with identical gradients; returns both sides."""
    ours = [p.requires_grad_() for p in make_params(shapes, dtype, device)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    if groups is None:
        opt_ours, opt_theirs = FusedNAG(ours, **hyper), sgd(theirs, **hyper)
    else:  # groups: list of (indices, overrides)
        opt_ours = FusedNAG([dict(params=[ours[i] for i in idx], **o) for idx, o in groups], **hyper)
        opt_theirs = sgd([dict(params=[theirs[i] for i in idx], **o) for idx, o in groups], **hyper)
    for step in range(steps):
        for p, q, g in zip(ours, theirs, make_grads(ours, step), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    return ours, theirs, opt_ours, opt_theirs


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_torch_sgd(device, dtype, weight_decay, maximize):
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=weight_decay, maximize=maximize)
    ours, theirs, opt_ours, opt_theirs = run_both(SHAPES, dtype, device, **hyper)
    # float32/float64: bit-identical. torch rounds fp16/bf16 after every operation, FusedNAG once per step: a looser
    # bound there, and the exact contract is checked step by step against float64 in test_low_precision_rounds_once.
    tol = dict(rtol=0.05, atol=0.05) if dtype in LOW_PRECISION else {}
    assert_same_state(ours, theirs, opt_ours, opt_theirs, **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_low_precision_rounds_once(device, dtype):
    """Each step equals torch SGD run in float64 from the same state, rounded once to the tensor dtype."""
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
    params = [p.requires_grad_() for p in make_params(SHAPES, dtype, device)]
    opt = FusedNAG(params, **hyper)
    for step in range(STEPS):
        grads = make_grads(params, step)
        exact = [p.detach().double().requires_grad_() for p in params]
        oracle = sgd(exact, **hyper)
        for p, e, g in zip(params, exact, grads, strict=True):
            p.grad, e.grad = g, g.double()
            if step > 0:
                oracle.state[e]["momentum_buffer"] = opt.state[p]["momentum_buffer"].double()
        opt.step()
        oracle.step()
        for p, e in zip(params, exact, strict=True):
            torch.testing.assert_close(p.detach(), e.detach().to(dtype), **low_precision_tol(dtype))
            torch.testing.assert_close(opt.state[p]["momentum_buffer"],
                                       oracle.state[e]["momentum_buffer"].to(dtype), **low_precision_tol(dtype))


def test_many_tensors_and_several_launches(device):
    # 1000 tensors: more than one launch holds (640 segments), with empty ones between and last.
    gen = torch.Generator().manual_seed(3)
    shapes = [(int(n),) for n in torch.randint(0, 300, (999,), generator=gen)] + [(0,)]
    ours, theirs, opt_ours, opt_theirs = run_both(shapes, torch.float32, device, steps=3, lr=0.1, weight_decay=1e-3)
    assert_same_state(ours, theirs, opt_ours, opt_theirs)


def test_param_groups(device, dtype):
    groups = [([0, 1], dict(lr=0.1)), ([2, 3], dict(momentum=0.5, weight_decay=0.1)), ([4, 5, 6, 7], dict(maximize=True))]
    ours, theirs, opt_ours, opt_theirs = run_both(SHAPES, dtype, device, groups=groups, lr=0.01)
    tol = dict(rtol=0.05, atol=0.05) if dtype in LOW_PRECISION else {}
    assert_same_state(ours, theirs, opt_ours, opt_theirs, **tol)


def test_mixed_dtypes_in_one_group(device):
    shapes = [(100,), (5000,), (31,), (17, 3)]
    ours = [p.requires_grad_() for p in make_params(shapes, torch.float32, device)]
    ours[1] = ours[1].detach().double().requires_grad_()
    ours[3] = ours[3].detach().double().requires_grad_()
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt_ours, opt_theirs = FusedNAG(ours, lr=0.1), sgd(theirs, lr=0.1)
    for step in range(STEPS):
        for p, q, g in zip(ours, theirs, make_grads(ours, step), strict=True):
            p.grad, q.grad = g, g.clone()
        opt_ours.step()
        opt_theirs.step()
    assert_same_state(ours, theirs, opt_ours, opt_theirs)


def test_late_first_gradient(device):
    """A param whose first grad arrives at step 3 starts its own buffer then (buf = g)."""
    ours = [p.requires_grad_() for p in make_params([(50,), (70,), (4099,)], torch.float32, device)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt_ours, opt_theirs = FusedNAG(ours, lr=0.1, weight_decay=0.01), sgd(theirs, lr=0.1, weight_decay=0.01)
    for step in range(STEPS):
        for i, (p, q, g) in enumerate(zip(ours, theirs, make_grads(ours, step), strict=True)):
            late = i == 1 and step < 3
            p.grad, q.grad = (None, None) if late else (g, g.clone())
        opt_ours.step()
        opt_theirs.step()
        if step < 3:
            assert "momentum_buffer" not in opt_ours.state.get(ours[1], {})
            torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=0)  # untouched
    assert_same_state(ours, theirs, opt_ours, opt_theirs)


def test_grad_is_never_modified(device, dtype):
    params = [p.requires_grad_() for p in make_params(SHAPES, dtype, device)]
    opt = FusedNAG(params, lr=0.1, weight_decay=0.1, maximize=True)
    for step in range(2):
        grads = make_grads(params, step)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, grads, strict=True):
            assert torch.equal(p.grad, g)


def test_complex_params(device):
    gen = torch.Generator().manual_seed(5)
    ours = [torch.randn(s, dtype=torch.complex64, generator=gen).to(device).requires_grad_() for s in [(3,), (4099,)]]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt_ours, opt_theirs = FusedNAG(ours, lr=0.1, weight_decay=0.01), sgd(theirs, lr=0.1, weight_decay=0.01)
    for _ in range(STEPS):
        for p, q in zip(ours, theirs, strict=True):
            g = torch.randn(p.shape, dtype=p.dtype, generator=gen).to(device)
            p.grad, q.grad = g, g.clone()
        opt_ours.step()
        opt_theirs.step()
    # torch's complex add(..., alpha=x) multiplies by a complex alpha and then adds (no fused multiply-add), so the
    # last bit can differ from the real-pair update.
    assert_same_state(ours, theirs, opt_ours, opt_theirs, rtol=1e-6, atol=1e-6)
    assert opt_ours.state[ours[0]]["momentum_buffer"].dtype == torch.complex64


def _layouts(device):
    """(param, grad) pairs of awkward layouts, built fresh from one seed."""
    gen = torch.Generator().manual_seed(7)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    base = rnd(4101)
    return {
        # contiguous but 4 bytes past a 16-byte boundary: the CUDA kernel's scalar (unaligned) path
        "unaligned_view": (base[1:4100], rnd(4101)[2:4101]),
        "transposed_same_strides": (rnd(65, 33).t(), rnd(65, 33).t()),
        "transposed_param_contiguous_grad": (rnd(65, 33).t(), rnd(33, 65)),
        "strided_slice": (rnd(40, 130)[:, ::2], rnd(40, 65)),
        "channels_last": (rnd(2, 3, 9, 11).to(memory_format=torch.channels_last), rnd(2, 3, 9, 11)),
    }


@pytest.mark.parametrize("layout", ["unaligned_view", "transposed_same_strides", "transposed_param_contiguous_grad",
                                    "strided_slice", "channels_last"])
def test_non_contiguous_and_unaligned(device, layout):
    p_ours, grad = _layouts(device)[layout]
    p_theirs = p_ours.clone()
    p_ours = p_ours.detach().requires_grad_()  # keeps the view's layout: detach() shares storage and strides
    p_theirs = p_theirs.detach().requires_grad_()
    opt_ours, opt_theirs = FusedNAG([p_ours], lr=0.1, weight_decay=0.01), sgd([p_theirs], lr=0.1, weight_decay=0.01)
    for step in range(STEPS):
        p_ours.grad = grad * (step + 1)
        p_theirs.grad = grad * (step + 1)
        opt_ours.step()
        opt_theirs.step()
    assert_same_state([p_ours], [p_theirs], opt_ours, opt_theirs)


@requires_cuda_kernel
def test_current_cuda_stream_is_used():
    """Gradients produced on a side stream right before step(): the kernel must run on that (current) stream."""
    ours = [p.requires_grad_() for p in make_params([(2048, 2048), (4099,)], torch.float32, "cuda")]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt_ours, opt_theirs = FusedNAG(ours, lr=0.01), sgd(theirs, lr=0.01)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    for step in range(3):
        grads = make_grads(ours, step)
        with torch.cuda.stream(side):
            for p, g in zip(ours, grads, strict=True):
                p.grad = (g @ g.T / 2048 if g.dim() == 2 else g * 2)  # slow work queued just before step()
            opt_ours.step()
        side.synchronize()
        for q, g in zip(theirs, grads, strict=True):
            q.grad = g @ g.T / 2048 if g.dim() == 2 else g * 2
        opt_theirs.step()
    assert_same_state(ours, theirs, opt_ours, opt_theirs, rtol=1e-4, atol=1e-4)
