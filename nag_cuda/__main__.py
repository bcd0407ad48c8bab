"""`python -m nag_cuda`: what this installation was built with."""

from pathlib import Path

import torch

import nag_cuda
from nag_cuda._ops import _C, built_for


def main() -> None:
    info = nag_cuda.build_info()
    print(f"nag_cuda {nag_cuda.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    built = built_for(Path(_C.__file__))
    print(f"built against: torch {built[0]}" if built else "built against: not recorded")
    # (the kernels' libraries are on torch's stable ABI: one build serves every torch from 2.11 on)
    for name in ("_kernels", "_kernels_cuda"):
        if hasattr(nag_cuda, name):
            print(f"kernels: {getattr(nag_cuda, name).__file__} (stable ABI, torch >= 2.11)")
    print(f"CPU kernel: {'yes' if info['cpu'] else 'no'}")
    archs = ", ".join(f"sm_{a}" for a in info["cuda_archs"])
    print(f"CUDA kernel: {'yes (' + archs + ')' if info['cuda'] else 'no'}")
    print(f"CUDA device available: {'yes' if torch.cuda.is_available() else 'no'}")


if __name__ == "__main__":
    main()
