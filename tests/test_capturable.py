"""A tensor learning rate read on the device, capturable=True, and whole training steps captured in CUDA graphs."""
import copy

import pytest
import torch

from conftest import requires_cuda_kernel
from nag_cuda import FusedNAG

pytestmark = pytest.mark.usefixtures("step_path")  # every test on both step paths (conftest.py)

KW = dict(momentum=0.9, weight_decay=1e-2)


def model_pair(device):
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)).to(device)
    return ours, copy.deepcopy(ours)


def train_step(model, opt, x, y):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def assert_same(ours, theirs, opt_ours, opt_theirs):
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        torch.testing.assert_close(opt_ours.state[p]["momentum_buffer"], opt_theirs.state[q]["momentum_buffer"],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("capturable", [False, True])
def test_tensor_lr_follows_scheduler_and_matches_torch(device, capturable):
    ours, theirs = model_pair(device)
    lr = torch.tensor(0.1, device=device)
    opt_ours = FusedNAG(ours.parameters(), lr=lr, capturable=capturable, **KW)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1, nesterov=True, foreach=False, **KW)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt_ours, opt_theirs)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(7):
        x, y = torch.randn(8, 20, generator=gen).to(device), torch.randn(8, 3, generator=gen).to(device)
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            train_step(model, opt, x, y)
        for s in scheds:
            s.step()
        assert_same(ours, theirs, opt_ours, opt_theirs)
    assert opt_ours.param_groups[0]["lr"] is lr  # updated in place, as captured graphs need
    assert lr.item() == pytest.approx(0.1 * 0.5**3)


def test_capturable_first_step_starts_from_zero_buffers(device):
    """capturable: no first-step special case, yet the first step's numbers are torch's."""
    ours, theirs = model_pair(device)
    opt_ours = FusedNAG(ours.parameters(), lr=0.1, capturable=True, **KW)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1, nesterov=True, foreach=False, **KW)
    x, y = torch.randn(8, 20, device=device), torch.randn(8, 3, device=device)
    for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
        train_step(model, opt, x, y)
    assert_same(ours, theirs, opt_ours, opt_theirs)


def test_capturable_needs_number_momentum():
    with pytest.raises(ValueError, match="capturable"):
        FusedNAG([torch.zeros(2, requires_grad=True)], lr=0.1, momentum=torch.tensor(0.9), capturable=True)


def test_bad_tensor_lr_changes_nothing():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="lr"):
        FusedNAG([p], lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="learning rate"):
        FusedNAG([p], lr=torch.tensor(-0.1))


@requires_cuda_kernel
def test_step_with_tensor_lr_does_not_synchronize():
    ours, _ = model_pair("cuda")
    opt = FusedNAG(ours.parameters(), lr=torch.tensor(0.1, device="cuda"), capturable=True, **KW)
    ours(torch.randn(8, 20, device="cuda")).sum().backward()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda_kernel
@pytest.mark.parametrize("clip", [None, 0.05], ids=["step", "clipped-step"])
def test_cuda_graph_of_a_whole_training_step_matches_eager(clip):
    """Forward, backward and step captured once, replayed with new data and a scheduled lr, match eager steps; with
    max_grad_norm, the norm and the clip coefficient are captured too."""
    graphed, eager = model_pair("cuda")
    opt_g = FusedNAG(graphed.parameters(), lr=torch.tensor(0.1, device="cuda"), capturable=True, max_grad_norm=clip,
                     **KW)
    opt_e = FusedNAG(eager.parameters(), lr=0.1, max_grad_norm=clip, **KW)
    sched_g = torch.optim.lr_scheduler.StepLR(opt_g, step_size=3, gamma=0.5)
    sched_e = torch.optim.lr_scheduler.StepLR(opt_e, step_size=3, gamma=0.5)
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 20, generator=gen).cuda(), torch.randn(8, 3, generator=gen).cuda()) for _ in range(9)]
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()

    # Warm-up on a side stream, as torch.cuda.graph requires (it also creates the momentum buffers).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:2]:
            static_x.copy_(x)
            static_y.copy_(y)
            train_step(graphed, opt_g, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in batches[:2]:
        train_step(eager, opt_e, x, y)

    graph = torch.cuda.CUDAGraph()
    opt_g.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        torch.nn.functional.mse_loss(graphed(static_x), static_y).backward()
        opt_g.step()
    for x, y in batches[2:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        train_step(eager, opt_e, x, y)
        sched_g.step()
        sched_e.step()
    torch.cuda.synchronize()
    for p, q in zip(graphed.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_tensor_lr_dtypes():
    """Any real 1-element lr that torch's SGD takes (tensors of every dtype and shape (1,), numpy scalars) gives
    torch's result, bit for bit."""
    import numpy as np

    lrs = [0.125, torch.tensor(0.1), torch.tensor(0.1, dtype=torch.float64), torch.tensor([0.1]),
           torch.tensor(0.1, dtype=torch.bfloat16), torch.tensor(0.1, dtype=torch.float16),
           torch.tensor(1, dtype=torch.int64), np.array(0.1), np.float32(0.1)]
    for lr in lrs:
        p = torch.arange(5.0, requires_grad=True)
        q = p.detach().clone().requires_grad_()
        ours = FusedNAG([p], lr=lr, **KW)
        theirs = torch.optim.SGD([q], lr=lr, nesterov=True, foreach=False, **KW)
        for step in range(3):
            p.grad = torch.linspace(-1, 1, 5) * (step + 1)
            q.grad = p.grad.clone()
            ours.step()
            theirs.step()
        assert torch.equal(p, q), lr
