"""Low-precision modes: momentum_dtype, master_weights, stochastic_rounding (each against torch or the reference)."""

import copy
import math

import pytest
import torch

from conftest import requires_cuda_kernel
from nag_cuda import FusedNAG
from nag_cuda.reference import nag_step_reference
from test_parity import SHAPES, STEPS, make_grads, make_params, sgd

pytestmark = pytest.mark.usefixtures("step_path")  # every test on both step paths (conftest.py)

HYPER = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
# (param dtype, momentum_dtype): every pair with a buffer dtype other than the param's.
MIXED = [(torch.float32, torch.bfloat16), (torch.float16, torch.float32), (torch.bfloat16, torch.float32)]
ids = lambda v: str(v).removeprefix("torch.")  # noqa: E731


def train(params, opt, steps=STEPS, start=0):
    for step in range(start, start + steps):
        for p, g in zip(params, make_grads(params, step), strict=True):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("param_dtype,momentum_dtype", MIXED, ids=ids)
def test_momentum_dtype_matches_reference(device, param_dtype, momentum_dtype):
    """Both kernels and the pure-PyTorch reference compute in float32 and round once per store: equal bits."""
    ours = make_params(SHAPES, param_dtype, device)
    ref = [p.clone() for p in ours]
    opt = FusedNAG(ours, momentum_dtype=momentum_dtype, **HYPER)
    ref_bufs = [torch.empty_like(p, dtype=momentum_dtype) for p in ref]
    for step in range(STEPS):
        grads = make_grads(ours, step)
        for p, g in zip(ours, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        nag_step_reference(ref, grads, ref_bufs, [step == 0] * len(ref), HYPER["lr"], HYPER["momentum"],
                           HYPER["weight_decay"], False)
    for p, q, b in zip(ours, ref, ref_bufs, strict=True):
        assert opt.state[p]["momentum_buffer"].dtype == momentum_dtype
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], b, rtol=0, atol=0)


@pytest.mark.parametrize("momentum_dtype", [None, torch.float32, "param"], ids=["default", "float32", "param"])
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.bfloat16], ids=ids)
def test_master_weights_are_torch_sgd_in_float32(device, param_dtype, momentum_dtype):
    """The master weights follow torch SGD run on float32 params bit for bit; the param is their rounding."""
    momentum_dtype = param_dtype if momentum_dtype == "param" else momentum_dtype
    ours = [p.requires_grad_() for p in make_params(SHAPES, param_dtype, device)]
    theirs = [p.detach().float().requires_grad_() for p in ours]
    opt = FusedNAG(ours, master_weights=True, momentum_dtype=momentum_dtype, **HYPER)
    opt_theirs = sgd(theirs, **HYPER)
    for step in range(STEPS):
        for p, q, g in zip(ours, theirs, make_grads(ours, step), strict=True):
            p.grad, q.grad = g, g.float()
        opt.step()
        opt_theirs.step()
    for p, q in zip(ours, theirs, strict=True):
        master = opt.state[p]["master_param"]
        assert master.dtype == torch.float32 and p.dtype == param_dtype
        buf = opt.state[p]["momentum_buffer"]
        assert buf.dtype == (momentum_dtype or torch.float32)
        if momentum_dtype == param_dtype:  # the rounded buffer feeds back: the reference, not torch
            continue
        torch.testing.assert_close(master, q.detach(), rtol=0, atol=0)
        torch.testing.assert_close(buf, opt_theirs.state[q]["momentum_buffer"], rtol=0, atol=0)
        torch.testing.assert_close(p.detach(), q.detach().to(param_dtype), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [dict(master_weights=True), dict(stochastic_rounding=True, sr_seed=3),
                                    dict(momentum_dtype=torch.float32)], ids=["master", "stochastic", "fp32-momentum"])
def test_state_dict_resumes_exactly(device, kwargs):
    """A checkpoint mid-run (deep-copied, as from disk) resumes to the same bits; float32 state stays float32."""
    params = make_params(SHAPES, torch.bfloat16, device)
    opt = FusedNAG(params, **HYPER, **kwargs)
    train(params, opt, 3)
    saved_params, saved_state = [p.clone() for p in params], copy.deepcopy(opt.state_dict())
    train(params, opt, 3, start=3)

    resumed = [p.clone() for p in saved_params]
    opt2 = FusedNAG(resumed, **HYPER, **{**kwargs, "sr_seed": 99} if "sr_seed" in kwargs else kwargs)
    opt2.load_state_dict(saved_state)
    for p, q in zip(params, resumed, strict=True):
        assert {k: v.dtype for k, v in opt.state[p].items()} == {k: v.dtype for k, v in opt2.state[q].items()}
    train(resumed, opt2, 3, start=3)
    for p, q in zip(params, resumed, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def bfloat16_neighbours(x):
    """The bfloat16 values just below and just above float32 x (equal where x is a bfloat16 value)."""
    bits = x.view(torch.int32)
    down = (bits & -65536).view(torch.float32)
    up = ((bits & -65536) + 65536).view(torch.float32)
    exact = down == x
    return down.where(x >= 0, up).to(torch.bfloat16), up.where(x >= 0, down).where(~exact, x).to(torch.bfloat16)


def test_stochastic_rounding_is_unbiased(device):
    """Mean of many rounded updates of a value a fraction of the way between two bfloat16 neighbours."""
    n = 1 << 20
    for start, fraction in [(1.0, 0.25), (-3.0, 0.1), (0.0078125, 0.7)]:
        ulp = 2.0 ** (math.frexp(abs(start))[1] - 8)  # bfloat16's spacing above |start| (8 significant bits)
        p = torch.full((n,), start, dtype=torch.bfloat16, device=device)
        opt = FusedNAG([p], lr=1.0, momentum=0.5, stochastic_rounding=True, sr_seed=7)
        p.grad = torch.full_like(p, -fraction * ulp / 1.5)  # first step: p - lr * (1 + momentum) * g
        opt.step()
        target = start + fraction * ulp
        assert set(p.float().unique().tolist()) == {start, start + ulp}
        mean = p.double().mean().item()
        # binomial standard error of the mean: ulp * sqrt(f(1-f)/n); 6 sigma
        assert abs(mean - target) < 6 * ulp * (fraction * (1 - fraction) / n) ** 0.5, (start, mean, target)

        nearest = torch.full_like(p, start)
        plain = FusedNAG([nearest], lr=1.0, momentum=0.5)
        nearest.grad = p.grad.clone()
        plain.step()
        assert (nearest.float() == start + (ulp if fraction > 0.5 else 0.0)).all()  # round to nearest: biased


def test_stochastic_rounding_picks_a_neighbour_of_the_float32_result(device):
    """Each param is one of the two bfloat16 neighbours of the float32 update; buffers are unaffected."""
    params = make_params(SHAPES, torch.bfloat16, device)
    exact = [p.float() for p in params]
    opt = FusedNAG(params, stochastic_rounding=True, sr_seed=1, **HYPER)
    bufs = [torch.empty_like(p) for p in params]
    grads = make_grads(params, 0)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()
    nag_step_reference(exact, [g.float() for g in grads], bufs, [True] * len(params), HYPER["lr"],
                       HYPER["momentum"], HYPER["weight_decay"], False)
    for p, x, b in zip(params, exact, bufs, strict=True):
        down, up = bfloat16_neighbours(x)
        assert ((p == down) | (p == up)).all()
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], b, rtol=0, atol=0)  # rounded to nearest


def test_stochastic_rounding_keeps_infinities_and_nan(device):
    p = torch.tensor([float("inf"), -float("inf"), float("nan"), 1.0] * 5, dtype=torch.bfloat16, device=device)
    opt = FusedNAG([p], lr=1e-3, stochastic_rounding=True, sr_seed=0)
    p.grad = torch.ones_like(p)
    opt.step()
    assert p[0::4].isposinf().all() and p[1::4].isneginf().all() and p[2::4].isnan().all()
    assert p[3::4].isfinite().all()


def test_stochastic_rounding_is_seeded_and_differs_between_steps(device):
    def run(seed, steps):
        p = torch.ones(50000, dtype=torch.bfloat16, device=device)
        opt = FusedNAG([p], lr=1e-3, stochastic_rounding=True, sr_seed=seed)
        for _ in range(steps):
            p.grad = torch.full_like(p, 0.37)
            opt.step()
        return p

    assert torch.equal(run(1, 2), run(1, 2))
    assert not torch.equal(run(1, 2), run(2, 2))
    torch.manual_seed(5)
    drawn = FusedNAG([torch.ones(1, dtype=torch.bfloat16)], stochastic_rounding=True).param_groups[0]["sr_seed"]
    torch.manual_seed(5)
    assert FusedNAG([torch.ones(1, dtype=torch.bfloat16)], stochastic_rounding=True).param_groups[0]["sr_seed"] == drawn
    opt = FusedNAG([torch.ones(1, dtype=torch.bfloat16)])  # a group added later draws its own seed
    opt.add_param_group(dict(params=[torch.ones(1, dtype=torch.bfloat16)], stochastic_rounding=True))
    assert isinstance(opt.param_groups[1]["sr_seed"], int) and opt.param_groups[0]["sr_seed"] is None
    # the same update at the next step is rounded with other random bits
    p = torch.ones(50000, dtype=torch.bfloat16, device=device)
    opt = FusedNAG([p], lr=1e-3, stochastic_rounding=True, sr_seed=1)
    rounded = []
    for _ in range(2):
        p.fill_(1.0)
        opt.state.clear()
        p.grad = torch.full_like(p, 0.37)
        opt.step()
        rounded.append(p.clone())
    assert not torch.equal(*rounded)


@requires_cuda_kernel
@pytest.mark.parametrize("kwargs", [dict(master_weights=True), dict(stochastic_rounding=True, sr_seed=11),
                                    dict(momentum_dtype=torch.float32)], ids=["master", "stochastic", "fp32-momentum"])
def test_cpu_and_cuda_kernels_agree_bit_for_bit(kwargs):
    """One math header, one schedule, one counter-based random stream: the same bits on both devices."""
    results = []
    for device in ("cpu", "cuda"):
        params = make_params(SHAPES, torch.bfloat16, device)
        opt = FusedNAG(params, **HYPER, **kwargs)
        train(params, opt)
        results.append([p.cpu() for p in params])
    for p, q in zip(*results, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_modes_across_param_groups_and_dtypes(device):
    """One optimizer with a group per mode, and float32 + bfloat16 params in one group: the same bits as each
    group stepped by an optimizer of its own."""
    groups = [(torch.bfloat16, dict(stochastic_rounding=True, sr_seed=4)),  # first: the group index is in the key
              (torch.bfloat16, dict(master_weights=True)),
              (torch.float32, dict(momentum_dtype=torch.bfloat16)),
              (None, dict(momentum_dtype=torch.float32))]  # bfloat16 and float32 params together
    made = [make_params(SHAPES, dtype, device, seed=i) if dtype else
            make_params(SHAPES, torch.bfloat16, device, seed=i) + make_params(SHAPES, torch.float32, device, seed=i)
            for i, (dtype, _) in enumerate(groups)]
    alone = [[p.clone() for p in ps] for ps in made]
    together = FusedNAG([dict(params=ps, **kw) for ps, (_, kw) in zip(made, groups, strict=True)], **HYPER)
    separate = [FusedNAG(ps, **HYPER, **kw) for ps, (_, kw) in zip(alone, groups, strict=True)]
    for step in range(STEPS):
        for ps, qs in zip(made, alone, strict=True):
            for p, q, g in zip(ps, qs, make_grads(ps, step), strict=True):
                p.grad, q.grad = g, g.clone()
        together.step()
        for opt in separate:
            opt.step()
    for p, q in zip([p for ps in made for p in ps], [p for ps in alone for p in ps], strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,kwargs,message", [
    (torch.float32, dict(master_weights=True), "master_weights=True is for float16 and bfloat16 params; a param has "
                                               "dtype torch.float32"),
    (torch.float64, dict(master_weights=True), "dtype torch.float64"),
    (torch.float32, dict(stochastic_rounding=True), "stochastic_rounding=True is for bfloat16 params; a param has "
                                                    "dtype torch.float32"),
    (torch.float16, dict(stochastic_rounding=True), "dtype torch.float16"),
    (torch.bfloat16, dict(momentum_dtype=torch.float16), "momentum_dtype=torch.float16 is not supported for a param "
                                                         "of dtype torch.bfloat16"),
    (torch.float64, dict(momentum_dtype=torch.float32), "momentum_dtype=torch.float32"),
    (torch.bfloat16, dict(master_weights=True, stochastic_rounding=True), "exclude each other"),
    (torch.bfloat16, dict(stochastic_rounding=True, capturable=True), "capturable"),
], ids=lambda v: str(v).replace(" ", "")[:40])
def test_nonsensical_options_are_a_value_error_at_construction(dtype, kwargs, message):
    p = torch.randn(10, dtype=dtype)
    with pytest.raises(ValueError, match=message):
        FusedNAG([p], **kwargs)
    opt = FusedNAG([torch.randn(3, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match=message):  # a group added later is checked too
        opt.add_param_group(dict(params=[p], **kwargs))
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("kwargs", [dict(momentum_dtype="float32"), dict(stochastic_rounding=True, sr_seed=1.5)],
                         ids=["dtype-as-string", "float-seed"])
def test_option_of_the_wrong_type_is_a_type_error(kwargs):
    with pytest.raises(TypeError, match="momentum_dtype|sr_seed"):
        FusedNAG([torch.randn(10, dtype=torch.bfloat16)], **kwargs)


@pytest.mark.parametrize("mode", ["plain", "master", "stochastic"])
def test_construction_checks_match_the_kernels(mode):
    """FusedNAG's option checks (Python) accept exactly the kinds the op has kernels for (visit_kind, C++)."""
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    for param_dtype in dtypes:
        for buf_dtype in dtypes:
            p = torch.randn(10, dtype=param_dtype)
            options = dict(momentum_dtype=buf_dtype, master_weights=mode == "master",
                           stochastic_rounding=mode == "stochastic")
            try:
                FusedNAG([p], **options)
                python_ok = True
            except ValueError:
                python_ok = False
            kwargs = dict(master_params=[p.float()]) if mode == "master" else (
                dict(sr_seed=1) if mode == "stochastic" else {})
            try:
                torch.ops.nag_cuda._check_step([p], [p.clone()], [p.to(buf_dtype)], [False], None,
                                               master_params=kwargs.get("master_params"),
                                               stochastic=mode == "stochastic")
                kernel_ok = True
            except RuntimeError:
                kernel_ok = False
            assert python_ok == kernel_ok, (param_dtype, buf_dtype, mode)


def test_op_rejects_unsupported_kinds_before_writing():
    p, g = torch.randn(100), torch.randn(100)
    b = torch.randn(100, dtype=torch.float16)
    saved = p.clone()
    with pytest.raises(RuntimeError, match="no kernel for params\\[0\\] of dtype Float with momentum_buffers"):
        torch.ops.nag_cuda.nag_step_([p], [g], [b], [False], 0.1, 0.9, 0.0, False)
    with pytest.raises(RuntimeError, match="master_params\\[0\\] has dtype BFloat16, expected Float"):
        torch.ops.nag_cuda.nag_step_([p.bfloat16()], [g.bfloat16()], [g.bfloat16()], [False], 0.1, 0.9, 0.0, False,
                                     master_params=[p.bfloat16()])
    assert torch.equal(p, saved)


@pytest.mark.parametrize("kwargs", [dict(master_params=True), dict(sr_seed=5)], ids=["master", "stochastic"])
def test_opcheck(device, kwargs):
    params = make_params(SHAPES, torch.bfloat16, device)
    args = (params, make_grads(params, 0), make_grads(params, 1), [False] * len(params), 0.05, 0.9, 1e-2, False)
    if "master_params" in kwargs:
        kwargs = dict(master_params=[p.float() for p in params])
    torch.library.opcheck(torch.ops.nag_cuda.nag_step_.default, args, kwargs)
