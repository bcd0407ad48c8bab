"""nag_cuda: FusedNAG, a fused multi-tensor Nesterov-momentum SGD optimizer for PyTorch."""

from importlib.metadata import PackageNotFoundError, version

from ._ops import build_info
from .optimizer import FusedNAG

try:
    __version__ = version("nag_cuda")
except PackageNotFoundError:
    __version__ = "unknown"

__all__ = ["FusedNAG", "build_info", "__version__"]
