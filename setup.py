"""Builds nag_cuda._C against the torch that is already installed (pip install --no-build-isolation .).

CUDA or CPU build is decided from torch and the toolkit, never from whether a GPU is visible:
  NAG_CUDA_BUILD=1  CUDA build (fails if torch has no CUDA or nvcc is missing)
  NAG_CUDA_BUILD=0  CPU build
  unset             CUDA build when torch.version.cuda is set and nvcc is found (CUDA_HOME), else CPU build
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "8.0;9.0+PTX": A100, H100, and PTX for newer GPUs).
"""

import os
import sys
from pathlib import Path

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as error:
    # pip's default build isolation runs this file in a fresh environment that has only setuptools: the torch the
    # extension must be built against (and later loaded with) is not there.
    isolated = any("pip-build-env" in path for path in sys.path)
    raise SystemExit(
        f"nag_cuda: cannot import torch ({error}). nag_cuda compiles against the torch of the environment it is "
        "installed into, so it must be built there:\n"
        "    pip install --no-build-isolation .\n"
        + ("(plain `pip install .` builds in an isolated environment that has no torch; torch is deliberately not a "
           "build requirement, since pip would then build against a different torch than the one you run.)"
           if isolated else "Install torch first (https://pytorch.org/get-started/), then run the command above.")
    ) from None

DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def want_cuda() -> bool:
    forced = os.environ.get("NAG_CUDA_BUILD")
    can = torch.version.cuda is not None and CUDA_HOME is not None
    if forced not in (None, "", "0", "1"):
        raise SystemExit(f"NAG_CUDA_BUILD must be 0 or 1, got {forced!r}")
    if forced == "1" and not can:
        raise SystemExit(
            f"NAG_CUDA_BUILD=1 but torch.version.cuda={torch.version.cuda} and CUDA_HOME={CUDA_HOME}: "
            "a CUDA build needs a CUDA build of torch and nvcc"
        )
    return can if forced in (None, "") else forced == "1"


def extension():
    csrc = Path("csrc")
    sources = [str(csrc / f) for f in ("nag_ops.cpp", "nag_step.cpp", "nag_cpu.cpp")]
    # -fopenmp: at::parallel_for runs serially in code compiled without OpenMP.
    # No contraction into fused multiply-adds beyond the explicit fma() calls, so CPU and GPU round identically
    # (see nag_math.h).
    # -fno-trapping-math lets gcc turn the math's selects into vector blends (the kernel never reads FP flags).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
    common = dict(name="nag_cuda._C", include_dirs=[str(csrc.resolve())], extra_link_args=["-fopenmp"])
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        print(f"nag_cuda: CUDA build (CUDA {torch.version.cuda}, archs {os.environ['TORCH_CUDA_ARCH_LIST']})")
        sources += [str(csrc / "nag_cuda.cpp"), str(csrc / "nag_kernel.cu")]
        return CUDAExtension(
            sources=sources,
            extra_compile_args={"cxx": cxx + ["-DNAG_WITH_CUDA"], "nvcc": ["-O3", "-fmad=false", "-DNAG_WITH_CUDA"]},
            **common,
        )
    print("nag_cuda: CPU build")
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **common)


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
