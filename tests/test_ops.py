"""The op torch.ops.nag_cuda.nag_step_ itself: dispatcher checks, the reference implementation, bad input."""

import pytest
import torch

import nag_cuda
from nag_cuda._ops import step_function
from nag_cuda.reference import nag_step_reference
from conftest import requires_cuda_kernel
from test_parity import SHAPES, make_grads, make_params

op = torch.ops.nag_cuda.nag_step_.default
HYPER = (0.05, 0.9, 1e-2, False)  # lr, momentum, weight_decay, maximize


def op_args(dtype, device, first=True):
    params = make_params(SHAPES, dtype, device)
    grads = make_grads(params, 0)
    bufs = make_grads(params, 1)
    return params, grads, bufs, [first] * len(params)


@pytest.mark.parametrize("first", [True, False])
def test_opcheck(device, dtype, first):
    # schema (mutation annotations), fake tensor, autograd registration, and torch.compile's view of the op
    torch.library.opcheck(op, (*op_args(dtype, device, first), *HYPER))


def test_opcheck_tensor_lr(device):
    lr = torch.tensor(HYPER[0], device=device)
    torch.library.opcheck(torch.ops.nag_cuda.nag_step_.tensor_lr, (*op_args(torch.float32, device, False), lr,
                                                                   *HYPER[1:]))


@pytest.mark.parametrize("found_inf", [0.0, 1.0])
def test_opcheck_with_grad_scaler_tensors(device, found_inf):
    amp = dict(grad_scale=torch.tensor(64.0, device=device), found_inf=torch.tensor(found_inf, device=device))
    torch.library.opcheck(op, (*op_args(torch.float32, device, False), *HYPER), amp)


@pytest.mark.parametrize("maximize", [False, True])
def test_kernel_matches_reference_under_grad_scaler(device, dtype, maximize):
    ours = op_args(dtype, device, False)
    ref = [[t.clone() for t in ts] for ts in ours[:3]] + [ours[3]]
    amp = dict(grad_scale=torch.tensor(3.0, device=device), found_inf=torch.zeros((), device=device))
    op(*ours, 0.05, 0.9, 1e-2, maximize, **amp)
    nag_step_reference(*ref, 0.05, 0.9, 1e-2, maximize, **amp)
    for a, b in zip(ours[0] + ours[1] + ours[2], ref[0] + ref[1] + ref[2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("maximize", [False, True])
def test_kernel_matches_reference(device, dtype, maximize):
    """The kernel and the pure-PyTorch reference round the same float math once: results agree to the last bit."""
    for first in (True, False):
        ours = op_args(dtype, device, first)
        ref = [[t.clone() for t in ts] for ts in ours[:3]] + [ours[3]]
        op(*ours, 0.05, 0.9, 1e-2, maximize)
        nag_step_reference(*ref, 0.05, 0.9, 1e-2, maximize)
        for a, b in zip(ours[0] + ours[2], ref[0] + ref[2], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("grad_scale", [None, 3.0], ids=["plain", "grad_scale"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_every_16_bit_value(device, dtype, grad_scale):
    """Every bit pattern of the dtype (subnormals, infinities, NaNs) as param, grad and buffer, in a tensor that ends
    in a remainder: the kernel's conversions give the reference's bits, and NaN where it has NaN (NaN payloads aside,
    which even torch's own conversions do not agree on)."""
    gen = torch.Generator().manual_seed(0)
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)

    def shuffled():
        return every[torch.randperm(every.numel() + 13, generator=gen) % every.numel()].view(dtype).to(device)

    amp = {} if grad_scale is None else dict(grad_scale=torch.tensor(grad_scale, device=device),
                                             found_inf=torch.zeros((), device=device))
    for first in (True, False):
        ours = [[shuffled()], [shuffled()], [shuffled()], [first]]
        ref = [[t.clone() for t in ts] for ts in ours[:3]] + [ours[3]]
        op(*ours, *HYPER, **amp)
        nag_step_reference(*ref, *HYPER, **amp)
        for a, b in zip(ours[0] + ours[1] + ours[2], ref[0] + ref[1] + ref[2], strict=True):
            nan = b.isnan()
            assert torch.equal(a.isnan(), nan)
            assert torch.equal(a.view(torch.int16)[~nan], b.view(torch.int16)[~nan])


def test_reference_fallback_for_devices_without_kernel():
    with pytest.warns(UserWarning, match="no compiled kernel for meta"):
        assert step_function(torch.device("meta")) is nag_step_reference
    assert step_function(torch.device("cpu")) is op


def test_build_info():
    info = nag_cuda.build_info()
    assert info["cpu"] is True
    assert info["cuda"] == bool(info["cuda_archs"])


def _bad_inputs(device):
    """Each entry: (description, args, expected message). Everything else in the lists is valid."""
    def base():
        p, g, b, f = op_args(torch.float32, device)
        return [p, g, b, f]

    cases = []
    a = base(); a[1] = a[1][:-1]; cases.append(("short grads", a, "equal lengths"))
    a = base(); a[3] = a[3][:-1]; cases.append(("short is_first", a, "equal lengths"))
    a = base(); a[1][-1] = a[1][-1].double(); cases.append(("grad dtype", a, r"grads\[7\] has dtype"))
    a = base(); a[2][-1] = a[2][-1][:-1]; cases.append(("buffer shape", a, r"momentum_buffers\[7\] has shape"))
    a = base(); a[1][-1] = a[1][-1].to_sparse(); cases.append(("sparse grad", a, "sparse gradients"))
    a = base(); a[0][-1] = a[0][-1].long(); a[1][-1] = a[1][-1].long(); a[2][-1] = a[2][-1].long()
    cases.append(("integer param", a, r"params\[7\] has dtype"))
    a = base(); a[0][-1] = torch.zeros(1, device=device).expand(a[0][-1].shape)
    cases.append(("overlapping param", a, "overlapping"))
    return cases


@pytest.mark.parametrize("case", range(7))
def test_bad_input_changes_nothing(device, case):
    name, args, match = _bad_inputs(device)[case]
    written = (args[0], args[2])  # params and momentum buffers
    before = [[t.clone() for t in ts] for ts in written]
    with pytest.raises(RuntimeError, match=match):
        op(*args, *HYPER)
    for ts, olds in zip(written, before, strict=True):
        for t, old in zip(ts, olds, strict=True):
            assert torch.equal(t, old), name


@requires_cuda_kernel
def test_cuda_tensor_over_2_pow_31_elements():
    """64-bit indexing: a bfloat16 tensor of 2^31 + 1029 elements (12 GiB for p, grad and buffer)."""
    n = 2**31 + 1029
    p = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    g = torch.full((n,), 0.5, dtype=torch.bfloat16, device="cuda")
    g[-1029:] = 2.0
    b = torch.empty_like(p)
    op([p], [g], [b], [True], 0.25, 0.5, 0.0, False)
    # first step: buf = g, p = 1 - 0.25 * (g + 0.5 * g)
    expected = lambda v: 1 - 0.25 * 1.5 * v  # noqa: E731
    assert torch.all(p[:1024] == expected(0.5)) and torch.all(p[-1029:] == expected(2.0))
    assert torch.all(p[2**31 - 8 : 2**31 + 8][:8] == expected(0.5))
    assert torch.all(b[-1029:] == 2.0)
    assert int((p == expected(0.5)).sum()) == n - 1029
