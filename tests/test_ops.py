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


def _after_a_plain_param(device):
    """Each entry: (description, param, grad, buffer, master or None, expected message or None for a valid
    step). The op's checks take a short path for a param like the plain one before it (csrc/nag_ops.cpp,
    like_last_dense): each entry differs from a plain float32 (bfloat16 with a master) param in one thing."""
    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype, device=device)

    def with_master(param=None, grad=None, buf=None, master=None):
        param = r(4, 6, dtype=torch.bfloat16) if param is None else param
        return (param, r(4, 6, dtype=torch.bfloat16) if grad is None else grad,
                r(4, 6) if buf is None else buf, param.float() if master is None else master)

    with torch.inference_mode():
        inference = r(4, 6)
    return [
        ("transposed grad", r(4, 6), r(6, 4).t(), r(4, 6), None, None),
        ("strided param", r(4, 12)[:, ::2], r(4, 6), r(4, 6), None, None),
        ("strided param, grad and buffer alike", r(4, 12)[:, ::2], r(4, 12)[:, ::2], r(4, 12)[:, ::2], None, None),
        ("negative-view grad", r(4, 6), torch._neg_view(r(4, 6)), r(4, 6), None, None),
        ("float64 param, grad and buffer", r(4, 6, dtype=torch.float64), r(4, 6, dtype=torch.float64),
         r(4, 6, dtype=torch.float64), None, None),
        ("bfloat16 buffer", r(4, 6), r(4, 6), r(4, 6, dtype=torch.bfloat16), None, None),
        ("conjugate complex param", r(4, 6, dtype=torch.complex64).conj(), r(4, 6, dtype=torch.complex64),
         r(4, 6, dtype=torch.complex64), None, None),
        ("empty param", r(0, 6), r(0, 6), r(0, 6), None, None),
        ("inference grad", r(4, 6), inference, r(4, 6), None, None),
        ("grad shape", r(4, 6), r(6, 4), r(4, 6), None, r"grads\[1\] has shape"),
        ("grad dtype", r(4, 6), r(4, 6, dtype=torch.float64), r(4, 6), None, r"grads\[1\] has dtype"),
        ("buffer shape", r(4, 6), r(4, 6), r(24), None, r"momentum_buffers\[1\] has shape"),
        ("buffer rows", r(4, 6), r(4, 6), r(3, 6), None, r"momentum_buffers\[1\] has shape"),
        ("float64 param", r(4, 6, dtype=torch.float64), r(4, 6), r(4, 6), None, r"grads\[1\] has dtype"),
        ("grad on meta", r(4, 6), torch.empty(4, 6, device="meta"), r(4, 6), None, r"grads\[1\] is on meta"),
        ("expanded buffer", r(4, 6), r(4, 6), r(1, 6).expand(4, 6), None, "overlapping memory"),
        ("inference param", inference, r(4, 6), r(4, 6), None, "Inplace update to inference tensor"),
        ("sparse grad", r(4, 6), r(4, 6).to_sparse(), r(4, 6), None, "sparse gradients"),
        ("transposed master", *with_master(master=r(6, 4).t()), None),
        ("float16 param with master", *with_master(param=r(4, 6, dtype=torch.float16),
                                                  grad=r(4, 6, dtype=torch.float16)), None),
        ("master rows", *with_master(master=r(3, 6)), r"master_params\[1\] has shape"),
        ("master dtype", *with_master(master=r(4, 6, dtype=torch.float64)), r"master_params\[1\] has dtype"),
        ("expanded master", *with_master(master=r(1, 6).expand(4, 6)), "overlapping memory"),
    ]


@pytest.mark.parametrize("case", range(23))
def test_a_param_after_a_plain_one_is_checked_in_full(device, case):
    """A plain param first, then the odd one: a valid step matches the reference to the bit, an invalid one raises
    what it raises on its own and changes nothing."""
    name, param, grad, buf, master, match = _after_a_plain_param(device)[case]
    torch.manual_seed(0)
    plain_dtype = torch.float32 if master is None else torch.bfloat16
    first = [torch.randn(4, 6, dtype=plain_dtype, device=device) for _ in range(2)] + [torch.randn(4, 6, device=device)]
    lists = [[first[0], param], [first[1], grad], [first[2], buf]]
    masters = None if master is None else [first[0].float(), master]
    kwargs = {} if masters is None else dict(master_params=masters)
    written = lists[0] + lists[2] + (masters or [])
    before = [t.clone() for t in written]
    if match is not None:
        with pytest.raises(RuntimeError, match=match):
            op(*lists, [False, False], *HYPER, **kwargs)
        for t, old in zip(written, before, strict=True):
            assert torch.equal(t, old), name
        return
    ref = [[t.clone() for t in ts] for ts in lists]
    ref_kwargs = {} if masters is None else dict(master_params=[t.clone() for t in masters])
    op(*lists, [False, False], *HYPER, **kwargs)
    nag_step_reference(*ref, [False, False], *HYPER, **ref_kwargs)
    for a, b in zip(lists[0] + lists[2], ref[0] + ref[2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    if masters is not None:
        for a, b in zip(masters, ref_kwargs["master_params"], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not torch.equal(param, before[1]) or param.numel() == 0, name  # (it was stepped)


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
