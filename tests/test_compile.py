"""FusedNAG with torch.compile: a compiled model trains with it, and its step() compiles as one graph."""
import copy

import torch

from nag_cuda import FusedNAG

HYPER = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)


def models(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)).to(device)
    return model, copy.deepcopy(model)


def train(model, opt, step, device, steps=4):
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 8, generator=gen).to(device)
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        step()
        losses.append(loss.item())
    return losses


def assert_same(a, b, opt_a, opt_b):
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        torch.testing.assert_close(opt_a.state[p]["momentum_buffer"], opt_b.state[q]["momentum_buffer"], rtol=0, atol=0)


def test_compiled_model_trains_like_torch_sgd(device):
    ours, theirs = models(device)
    opt_ours = FusedNAG(ours.parameters(), **HYPER)
    opt_theirs = torch.optim.SGD(theirs.parameters(), nesterov=True, **HYPER)
    losses = train(torch.compile(ours), opt_ours, opt_ours.step, device)
    train(torch.compile(theirs), opt_theirs, opt_theirs.step, device)
    assert losses[-1] < losses[0]
    assert_same(ours, theirs, opt_ours, opt_theirs)


def test_compiled_step_is_one_graph_and_matches_eager(device):
    ours, eager = models(device)
    opt_ours, opt_eager = FusedNAG(ours.parameters(), **HYPER), FusedNAG(eager.parameters(), **HYPER)
    train(ours, opt_ours, torch.compile(opt_ours.step, fullgraph=True), device)  # fullgraph: a break would raise
    train(eager, opt_eager, opt_eager.step, device)
    assert_same(ours, eager, opt_ours, opt_eager)


def test_compiled_step_with_scheduler_needs_a_tensor_lr():
    """An LR scheduler wraps step() (no fullgraph then, as with torch's optimizers). A float lr is a constant of the
    compiled graph, so each new value compiles again; a tensor lr is read by the kernel and compiles once."""
    import torch._dynamo.testing

    frames = {}
    for kind, lr in (("float", 0.1), ("tensor", torch.tensor(0.1))):
        torch._dynamo.reset()
        model, _ = models("cpu")
        opt = FusedNAG(model.parameters(), lr=lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        counter = torch._dynamo.testing.CompileCounter()
        step = torch.compile(lambda: opt.step(), backend=counter)
        for _ in range(4):
            model(torch.randn(4, 8)).sum().backward()
            step()
            sched.step()
        frames[kind] = counter.frame_count
    assert frames["tensor"] <= 2 < frames["float"]  # tensor: the first step (new buffers) and the steady state
