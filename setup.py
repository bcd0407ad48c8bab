"""Builds nag_cuda against the torch that is already installed (pip install --no-build-isolation .).

CUDA or CPU build is decided from torch and the toolkit, never from whether a GPU is visible:
  NAG_CUDA_BUILD=1  CUDA build, or an error that says why it cannot be one
  NAG_CUDA_BUILD=0  CPU build
  unset             CUDA build when torch is a CUDA build and a toolkit of the same CUDA major version with its runtime
                    library is found (CUDA_HOME), else a CPU build, with the reason printed
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "8.0;9.0+PTX": A100, H100, and PTX for newer GPUs).
NAG_CUDA_SANITIZE=1 compiles and links with AddressSanitizer and UndefinedBehaviorSanitizer (CPU build only):
                  .ci/sanitize.sh builds it out of place and runs the step-path tests under it.
"""

import os
import re
import subprocess
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


def nvcc_version(cuda_home) -> str | None:
    """nvcc's CUDA release ("13.0"), or None where it does not run."""
    try:
        out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else None


def cudart_dir(cuda_home, build_dir=Path("build") / "cudart", fallbacks=("/usr/local/cuda",)) -> str | None:
    """A folder from which the linker's -lcudart finds the CUDA runtime: the toolkit's lib64, lib or targets/*/lib
    (torch's helpers look in lib64 only), else torch's nvidia-cuda-runtime wheel, whose versioned libcudart.so.N gets
    an unversioned link in build_dir. None if there is none."""
    homes = [cuda_home, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), *fallbacks]
    folders = []
    for home in dict.fromkeys(h for h in homes if h):
        folders += [Path(home) / "lib64", Path(home) / "lib", *sorted(Path(home).glob("targets/*/lib"))]
    for folder in folders:
        if (folder / "libcudart.so").exists():
            return str(folder)
    try:
        import nvidia.cuda_runtime

        versioned = sorted(Path(next(iter(nvidia.cuda_runtime.__path__))).glob("lib/libcudart.so.*"))
    except (ImportError, StopIteration):
        versioned = []
    if versioned:
        build_dir.mkdir(parents=True, exist_ok=True)
        link = build_dir / "libcudart.so"
        link.unlink(missing_ok=True)
        link.symlink_to(versioned[-1].resolve())
        return str(build_dir.resolve())
    return None


def cuda_build(cuda_home=None, torch_cuda=None) -> tuple[bool, str, str | None]:
    """(whether to build the CUDA kernel, why, the folder of libcudart). NAG_CUDA_BUILD=1 turns every reason not to
    into an error that says it, rather than a compiler or linker error later."""
    forced = os.environ.get("NAG_CUDA_BUILD")
    if forced not in (None, "", "0", "1"):
        raise SystemExit(f"NAG_CUDA_BUILD must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False, "NAG_CUDA_BUILD=0", None
    reason, library = None, None
    if torch_cuda is None:
        reason = f"this torch ({torch.__version__}) is not a CUDA build"
    elif cuda_home is None:
        reason = "no CUDA toolkit was found (nvcc on the PATH, or CUDA_HOME)"
    else:
        release = nvcc_version(cuda_home)
        library = cudart_dir(cuda_home)
        if release is None:
            reason = f"{Path(cuda_home) / 'bin' / 'nvcc'} does not run"
        elif release.split(".")[0] != torch_cuda.split(".")[0]:
            reason = (f"nvcc is CUDA {release} but torch was built with CUDA {torch_cuda}: their major versions must "
                      "match (point CUDA_HOME at a matching toolkit)")
        elif library is None:
            reason = (f"no libcudart.so in {cuda_home}/lib64, lib or targets/*/lib, nor in the nvidia-cuda-runtime "
                      "wheel (set CUDA_HOME to the toolkit's folder)")
    if reason is not None:
        if forced == "1":
            raise SystemExit(f"NAG_CUDA_BUILD=1, but {reason}")
        return False, reason, None
    return True, f"CUDA {torch_cuda}, nvcc in {cuda_home}", library


# The kernels' libraries are built on torch's stable ABI, for torch 2.11 and every later one (csrc/nag_kernels.h);
# their C++ sources (besides nag_kernel.cu), which .ci/check_cuda_sources.sh compiles with these flags too.
STABLE_ABI = ["-DTORCH_TARGET_VERSION=0x020b000000000000"]
CPU_KERNELS = ["nag_cpu.cpp", "kernels_cpu.cpp"]
CUDA_KERNELS = ["nag_cuda.cpp", "kernels_cuda.cpp"]


def extensions():
    """nag_cuda._C (the ops and the C++ step, tied to this torch), nag_cuda._kernels (the CPU kernels) and, in a CUDA
    build, nag_cuda._kernels_cuda."""
    csrc = Path("csrc")
    # No contraction into fused multiply-adds beyond the explicit fma() calls, so CPU and GPU round identically
    # (see nag_math.h).
    # -fno-trapping-math lets gcc turn the math's selects into vector blends (the kernel never reads FP flags).
    # -fvisibility-inlines-hidden: the inline torch accessors that gcc keeps out of line (TensorImpl::device(),
    # layout(), sizes()) are called directly rather than through the PLT: about 7% of a many-tensor step's host time.
    cxx = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fvisibility-inlines-hidden"]
    link = []
    sanitize = os.environ.get("NAG_CUDA_SANITIZE")
    if sanitize not in (None, "", "0", "1"):
        raise SystemExit(f"NAG_CUDA_SANITIZE must be 0 or 1, got {sanitize!r}")
    if sanitize == "1":  # ASan + UBSan (.ci/sanitize.sh); any UB report aborts, as ASan's do. -fno-wrapv undoes
        # Python's -fwrapv (in the flags setuptools passes first), which would make signed overflow defined and so
        # switch UBSan's check of it off.
        flags = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g",
                 "-fno-wrapv"]
        cxx, link = cxx + flags, link + flags
    common = dict(include_dirs=[str(csrc.resolve())], extra_link_args=link)
    cuda, why, library = cuda_build(CUDA_HOME, torch.version.cuda)
    if cuda and sanitize == "1":
        raise SystemExit(f"NAG_CUDA_SANITIZE=1 is for the CPU build only, but this is a CUDA build ({why}): "
                         "add NAG_CUDA_BUILD=0")
    module = [str(csrc / f) for f in ("nag_ops.cpp", "step.cpp", "step_read_groups.cpp", "step_gather.cpp",
                                      "step_run.cpp")]
    built = [
        CppExtension(name="nag_cuda._C", sources=module,
                     extra_compile_args={"cxx": cxx + (["-DNAG_WITH_CUDA"] if cuda else [])}, **common),
        CppExtension(name="nag_cuda._kernels", sources=[str(csrc / f) for f in CPU_KERNELS],
                     py_limited_api=True, extra_compile_args={"cxx": cxx + STABLE_ABI}, **common),
    ]
    if not cuda:
        print(f"nag_cuda: CPU build ({why})")
        return built
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    print(f"nag_cuda: CUDA build ({why}, archs {os.environ['TORCH_CUDA_ARCH_LIST']}, libcudart in {library})")
    # (USE_CUDA: torch's C shim declares the current-stream call only with it)
    return built + [CUDAExtension(
        name="nag_cuda._kernels_cuda",
        sources=[str(csrc / f) for f in CUDA_KERNELS] + [str(csrc / "nag_kernel.cu")],
        library_dirs=[library], py_limited_api=True,
        extra_compile_args={"cxx": cxx + STABLE_ABI + ["-DUSE_CUDA"], "nvcc": ["-O3", "-fmad=false"] + STABLE_ABI},
        **common,
    )]


# Beside the built library: the torch it was built against (torch.__version__ and torch.version.git_version, a line
# each), which nag_cuda reads before it loads the library (nag_cuda/_ops.py), since the library is tied to that torch.
# Named after the library (which names the Python it is for), so builds for two Pythons in one folder keep their own.
def torch_stamp(library: Path) -> Path:
    return library.with_name(library.name + ".torch-version")


class BuildWithStamp(BuildExtension):
    def run(self):
        built_for = f"{torch.__version__}\n{torch.version.git_version}\n"
        # (only the library tied to this torch: the kernels' ones work with any torch from 2.11 on)
        stamps = [torch_stamp(Path(self.get_ext_fullpath(ext.name))) for ext in self.extensions
                  if not ext.py_limited_api]
        # A library left by a build against another torch is compiled again (without ninja, setuptools would keep it:
        # torch's headers are not among its dependencies).
        if any(not s.is_file() or s.read_text() != built_for for s in stamps):
            self.force = True
        super().run()
        for stamp in stamps:
            stamp.write_text(built_for)


if __name__ == "__main__":  # (pip runs this file as __main__; tests import its helpers)
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildWithStamp})
