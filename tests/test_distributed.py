"""FusedNAG with torch.distributed, 2 CPU processes over gloo (loopback): DDP, FSDP2 (DTensor params) and
ZeroRedundancyOptimizer (with clipping too) each match single-process training on the whole batch, and their state round-trips."""
import copy
import datetime
import gc
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nag_cuda import FusedNAG

WORLD = 2
HYPER = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
STEPS = 4


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=gen), torch.randn(8, 4, generator=gen)) for _ in range(STEPS * 2)]


def train(model, opt, data, rank=None):
    """Steps on each batch; with a rank, on that rank's half of it (what DDP/FSDP average back to the whole)."""
    for x, y in data:
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def reference(data):
    """Single process, whole batches."""
    model = make_model()
    train(model, FusedNAG(model.parameters(), **HYPER), data)
    return model


def assert_close_to(params, ref):
    for p, q in zip(params, ref.parameters(), strict=True):
        torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)


def check_ddp(rank, data):
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    train(model, FusedNAG(model.parameters(), **HYPER), data[:STEPS], rank)
    assert_close_to(model.parameters(), reference(data[:STEPS]))
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, [p.detach() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(gathered[0], gathered[1], strict=True))  # ranks agree exactly


def check_fsdp2(rank, data):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (WORLD,))

    def sharded():
        model = make_model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, FusedNAG(model.parameters(), **HYPER)

    model, opt = sharded()
    train(model, opt, data[:STEPS], rank)
    for p in model.parameters():
        buf = opt.state[p]["momentum_buffer"]
        assert isinstance(buf, DTensor) and buf.placements == p.placements
        assert p.to_local().numel() < p.numel()  # only the shard lives here
    assert_close_to([p.full_tensor() for p in model.parameters()], reference(data[:STEPS]))

    # Distributed checkpoint round trip: a fresh sharded model and optimizer continue exactly where this one is.
    state = copy.deepcopy(get_optimizer_state_dict(model, opt))  # as from disk: not the live buffers
    model2, opt2 = sharded()
    model2.load_state_dict(model.state_dict())
    set_optimizer_state_dict(model2, opt2, state)
    train(model, opt, data[STEPS:], rank)
    train(model2, opt2, data[STEPS:], rank)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p.to_local(), q.to_local())
    assert_close_to([p.full_tensor() for p in model.parameters()], reference(data))

    # A grad sharded differently from its param is refused before anything changes.
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
    p.grad = distribute_tensor(torch.ones(4, 3), mesh, [Replicate()])
    opt3 = FusedNAG([p], **HYPER)
    with pytest.raises(ValueError, match="same placements"):
        opt3.step()
    assert torch.equal(p.full_tensor(), torch.ones(4, 3)) and not opt3.state


def check_fsdp2_modes(rank, data):
    """bfloat16 FSDP2 shards with each low-precision mode: the state is sharded like its param, keeps its dtype
    through a distributed checkpoint, and the restored run continues to the same bits."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (WORLD,))
    data = [(x.bfloat16(), y.bfloat16()) for x, y in data]

    def sharded(options):
        model = make_model().bfloat16()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, FusedNAG(model.parameters(), **HYPER, **options)

    for options, dtypes in [(dict(master_weights=True), dict(momentum_buffer=torch.float32, master_param=torch.float32)),
                            (dict(stochastic_rounding=True, sr_seed=3), dict(momentum_buffer=torch.bfloat16)),
                            (dict(momentum_dtype=torch.float32), dict(momentum_buffer=torch.float32))]:
        model, opt = sharded(options)
        train(model, opt, data[:STEPS], rank)
        state = copy.deepcopy(get_optimizer_state_dict(model, opt))
        model2, opt2 = sharded(options)
        model2.load_state_dict(model.state_dict())
        set_optimizer_state_dict(model2, opt2, state)
        for p in model2.parameters():
            assert {k: v.dtype for k, v in opt2.state[p].items()} == dtypes
            assert all(isinstance(v, DTensor) and v.placements == p.placements for v in opt2.state[p].values())
        train(model, opt, data[STEPS:], rank)
        train(model2, opt2, data[STEPS:], rank)
        for p, q in zip(model.parameters(), model2.parameters(), strict=True):
            assert torch.equal(p.to_local(), q.to_local()), options


def check_fsdp2_clip(rank, data):
    """max_grad_norm with FSDP2: the squared norms of the shards are summed across the mesh, so each rank clips by
    the norm of the whole model's grads, as single-process training does."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = make_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = FusedNAG(model.parameters(), **HYPER, max_grad_norm=0.05)
    single = make_model()
    opt_single = FusedNAG(single.parameters(), **HYPER, max_grad_norm=0.05)
    for x, y in data[:STEPS]:
        train(model, opt, [(x, y)], rank)
        train(single, opt_single, [(x, y)])
        assert opt.last_grad_norm > 0.05  # clipped
        torch.testing.assert_close(opt.last_grad_norm, opt_single.last_grad_norm, rtol=1e-5, atol=0)
    assert_close_to([p.full_tensor() for p in model.parameters()], single)


def check_zero(rank, data):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    def zero():
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        return model, ZeroRedundancyOptimizer(model.parameters(), optimizer_class=FusedNAG, **HYPER)

    model, opt = zero()
    train(model, opt, data[:STEPS], rank)
    assert_close_to(model.parameters(), reference(data[:STEPS]))

    opt.consolidate_state_dict(to=0)
    full = [copy.deepcopy(opt.state_dict()) if rank == 0 else None]  # as from disk: not the live buffers
    dist.broadcast_object_list(full, src=0)
    model2, opt2 = zero()
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(full[0])
    train(model, opt, data[STEPS:], rank)
    train(model2, opt2, data[STEPS:], rank)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def check_zero_clip(rank, data):
    """max_grad_norm under ZeroRedundancyOptimizer: each rank's FusedNAG holds only its partition of the params, and
    their norms are summed across the process group, so every rank clips by the norm of all the model's grads, as
    single-process training does (on both step paths: the C++ one hands such a step to the Python stages)."""
    import nag_cuda._step
    from torch.distributed.optim import ZeroRedundancyOptimizer

    for cpp in (True, False):
        nag_cuda._step.CPP_STEP = cpp
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=FusedNAG, **HYPER, max_grad_norm=0.05)
        assert opt.optim._zero_group is not None
        single = make_model()
        opt_single = FusedNAG(single.parameters(), **HYPER, max_grad_norm=0.05)
        for x, y in data[:STEPS]:
            train(model, opt, [(x, y)], rank)
            train(single, opt_single, [(x, y)])
            assert opt_single.last_grad_norm > 0.05  # clipped
            torch.testing.assert_close(opt.optim.last_grad_norm, opt_single.last_grad_norm, rtol=1e-5, atol=0)
        assert_close_to(model.parameters(), single)
    nag_cuda._step.CPP_STEP = True


def worker(rank, port, name):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        checks = {"ddp": check_ddp, "fsdp2": check_fsdp2, "fsdp2-modes": check_fsdp2_modes,
                  "fsdp2-clip": check_fsdp2_clip, "zero": check_zero, "zero-clip": check_zero_clip}
        checks[name](rank, batches())
        # DDP/FSDP objects sit in reference cycles: free them while their process group still exists (freed at
        # interpreter exit instead, gloo sometimes aborted with "terminate called without an active exception").
        gc.collect()
        dist.barrier()  # no rank tears the group down while the other still has collectives in flight
    finally:  # also when a check fails, so that the other rank and the next test are not left hanging
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("name", ["ddp", "fsdp2", "fsdp2-modes", "fsdp2-clip", "zero", "zero-clip"])
def test_two_processes(name):
    mp.spawn(worker, args=(free_port(), name), nprocs=WORLD, join=True)

