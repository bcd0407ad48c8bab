"""FusedNAG under torch.amp.GradScaler: unscaling and inf/nan skipping in the kernel, against torch's own SGD."""
import copy

import pytest
import torch

from conftest import requires_cuda_kernel
from nag_cuda import FusedNAG
from nag_cuda._ops import ops

pytestmark = pytest.mark.usefixtures("step_path")  # every test on both step paths (conftest.py)

HYPER = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)


def model_pair(device, seed=0):
    torch.manual_seed(seed)
    ours = torch.nn.Sequential(torch.nn.Linear(37, 300), torch.nn.Tanh(), torch.nn.Linear(300, 5)).to(device)
    return ours, copy.deepcopy(ours)


def assert_same(ours, theirs, opt_ours, opt_theirs, grads=True):
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        if grads:  # both left unscaled
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, equal_nan=True)
        if q in opt_theirs.state:
            torch.testing.assert_close(opt_ours.state[p]["momentum_buffer"], opt_theirs.state[q]["momentum_buffer"],
                                       rtol=0, atol=0)


def scaled_step(model, opt, scaler, x, y, poison=False, clip=None):
    opt.zero_grad()
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    if poison:  # an overflow, as fp16 backward passes produce
        next(model.parameters()).grad.view(-1)[3] = float("inf")
    if clip is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("clip", [None, 0.5], ids=["step", "unscale-clip-step"])
def test_matches_torch_sgd_under_grad_scaler(device, clip):
    """A skipped first step, normal steps, a later overflow: params, unscaled grads and buffers equal torch's."""
    ours, theirs = model_pair(device)
    opt_ours = FusedNAG(ours.parameters(), **HYPER)
    opt_theirs = torch.optim.SGD(theirs.parameters(), nesterov=True, foreach=False, **HYPER)
    scalers = [torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=3) for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    scales = [scalers[0].get_scale()]
    for step in range(10):
        x, y = torch.randn(16, 37, generator=gen).to(device), torch.randn(16, 5, generator=gen).to(device)
        before = [p.detach().clone() for p in ours.parameters()]
        for model, opt, scaler in ((ours, opt_ours, scalers[0]), (theirs, opt_theirs, scalers[1])):
            scaled_step(model, opt, scaler, x, y, poison=step in (0, 6), clip=clip)
        if step in (0, 6):  # skipped: nothing moved
            assert all(torch.equal(p, b) for p, b in zip(ours.parameters(), before, strict=True))
        if step == 0:  # no state from uninitialised memory: the only buffers are zeros
            assert not opt_theirs.state
            assert all(not s["momentum_buffer"].any() for s in opt_ours.state.values())
        # On a skipped step torch's unscale_ has unscaled the grads, while the kernel (like torch's fused SGD)
        # leaves them as they were, since it writes nothing; unless unscale_ ran first, they then differ.
        assert_same(ours, theirs, opt_ours, opt_theirs, grads=clip is not None or step not in (0, 6))
        assert scalers[0].get_scale() == scalers[1].get_scale()
        scales.append(scalers[0].get_scale())
    changes = {(b > a) - (b < a) for a, b in zip(scales, scales[1:])}
    assert {-1, 1} <= changes  # the scale both backed off and grew on the way


def test_autocast_training_matches_torch(device):
    """Mixed precision as users run it (float16 on CUDA, bfloat16 on CPU) gives torch SGD's results."""
    ours, theirs = model_pair(device, seed=3)
    opt_ours = FusedNAG(ours.parameters(), **HYPER)
    opt_theirs = torch.optim.SGD(theirs.parameters(), nesterov=True, foreach=False, **HYPER)
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    scalers = [torch.amp.GradScaler(device) for _ in range(2)]
    gen = torch.Generator().manual_seed(4)
    for _ in range(15):
        x, y = torch.randn(32, 37, generator=gen).to(device), torch.randn(32, 5, generator=gen).to(device)
        for model, opt, scaler in ((ours, opt_ours, scalers[0]), (theirs, opt_theirs, scalers[1])):
            opt.zero_grad()
            with torch.autocast(device, dtype=dtype):
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_op_unscales_in_place_or_skips(device, dtype):
    p = torch.randn(5000, device=device, dtype=dtype)
    g = torch.randn(5000, device=device, dtype=dtype) * 1024
    b = torch.randn(5000, device=device, dtype=dtype)
    scale = torch.tensor(1024.0, device=device)
    args = ([p], [g], [b], [False], 0.1, 0.9, 0.0, False)
    saved = [t.clone() for t in (p, g, b)]
    ops.nag_step_(*args, grad_scale=scale, found_inf=torch.ones((), device=device))
    assert all(torch.equal(t, s) for t, s in zip((p, g, b), saved, strict=True))  # skipped: nothing written

    expect_p, expect_b = p.clone(), b.clone()
    expect_g = (g.float() * scale.reciprocal()).to(dtype)
    ops.nag_step_([expect_p], [expect_g.clone()], [expect_b], [False], *args[4:])
    ops.nag_step_(*args, grad_scale=scale, found_inf=torch.zeros((), device=device))
    assert torch.equal(g, expect_g) and torch.equal(p, expect_p) and torch.equal(b, expect_b)


@pytest.mark.parametrize("bad", ["double", "two elements", pytest.param("other device", marks=requires_cuda_kernel)])
def test_bad_grad_scale_changes_nothing(bad):
    device = "cuda" if bad == "other device" else "cpu"
    p, g, b = (torch.randn(10, device=device) for _ in range(3))
    scale = {"double": torch.tensor(2.0, dtype=torch.float64), "two elements": torch.ones(2),
             "other device": torch.tensor(2.0)}[bad]
    saved = [t.clone() for t in (p, g, b)]
    with pytest.raises(RuntimeError, match="grad_scale"):
        ops.nag_step_([p], [g], [b], [False], 0.1, 0.9, 0.0, False, grad_scale=scale)
    assert all(torch.equal(t, s) for t, s in zip((p, g, b), saved, strict=True))


@requires_cuda_kernel
def test_grad_scaler_step_does_not_synchronize():
    ours, _ = model_pair("cuda")
    opt = FusedNAG(ours.parameters(), **HYPER)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(16, 37, device="cuda")
    scaler.scale(ours(x).sum()).backward()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scaler.step(opt)
    finally:
        torch.cuda.set_sync_debug_mode("default")
