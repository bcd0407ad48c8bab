import pytest
import torch

import nag_cuda
import nag_cuda._step

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOW_PRECISION = (torch.float16, torch.bfloat16)


# A device is tested when it is present and this build has its kernel (not merely when the device is present).
if not torch.cuda.is_available():
    requires_cuda_kernel = pytest.mark.skipif(True, reason="no CUDA device")
else:
    requires_cuda_kernel = pytest.mark.skipif(not nag_cuda.build_info()["cuda"],
                                              reason="CUDA device present but nag_cuda was built without its kernel")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda_kernel)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request):
    return request.param


def low_precision_tol(dtype):
    """One-step tolerance against a float64 oracle rounded to dtype: two units in the last place, relative."""
    return {torch.float16: dict(rtol=2**-9, atol=1e-5), torch.bfloat16: dict(rtol=2**-6, atol=1e-5)}[dtype]


@pytest.fixture(params=["cpp", "python"])
def step_path(request, monkeypatch):
    """Runs a test on each step path: the C++ copy of the step's stages (the default, which may still hand a step
    to Python), and the Python stages alone (nag_cuda/_step.py, the specification). Test files that use it for
    every test say `pytestmark = pytest.mark.usefixtures("step_path")`."""
    if request.param == "python":
        monkeypatch.setattr(nag_cuda._step, "CPP_STEP", False)
    return request.param
