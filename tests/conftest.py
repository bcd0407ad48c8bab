import pytest
import torch

import nag_cuda

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _devices():
    devices = [pytest.param("cpu", id="cpu")]
    if not torch.cuda.is_available():
        reason = "no CUDA device"
    elif not nag_cuda.build_info()["cuda"]:
        reason = "CUDA device present but nag_cuda was built without its CUDA kernel"
    else:
        reason = None
    devices.append(pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return devices


DEVICES = _devices()


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request):
    return request.param


def low_precision_tol(dtype):
    """One-step tolerance against a float64 oracle rounded to dtype: two units in the last place, relative."""
    return {torch.float16: dict(rtol=2**-9, atol=1e-5), torch.bfloat16: dict(rtol=2**-6, atol=1e-5)}[dtype]
