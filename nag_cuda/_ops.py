"""Loads the compiled ops (torch.ops.nag_cuda.*) and registers their fake implementation for tracing tools."""

import importlib.util
import sys
import warnings
from importlib import metadata
from pathlib import Path

import torch


def built_for(library: Path) -> tuple[str, str] | None:
    """The torch (version, git version) that the compiled library at `library` was built against, or None where the
    build did not record it."""
    stamp = library.with_name(library.name + ".torch-version")  # (written beside it by setup.py)
    if not stamp.is_file():
        return None
    version, _, git_version = stamp.read_text().partition("\n")
    return version, git_version.strip()


def check_built_for(library: Path) -> None:
    """ImportError, before the library is loaded, where it was built against another torch than the one running: it
    is linked to that torch's C++ symbols, so it would fail to load (`undefined symbol`) or call code that changed."""
    built = built_for(library)
    running = (torch.__version__, str(torch.version.git_version))
    if built is not None and built != running:
        raise ImportError(
            f"nag_cuda's compiled extension ({library}) was built against torch {built[0]} (git {built[1][:12]}), "
            f"but torch {running[0]} (git {running[1][:12]}) is running, and the extension works only with the torch "
            "it was built against. Rebuild it against this torch: `pip install --no-build-isolation "
            "--force-reinstall --no-deps <nag_cuda source folder>`, or install the torch it was built for."
        )


def _library() -> Path:
    """The file of the compiled module nag_cuda._C."""
    spec = importlib.util.find_spec("._C", __package__)
    if spec is not None and spec.origin is not None:
        return Path(spec.origin)
    # Imported from the source checkout (e.g. `python -c ...` in its root): the compiled libraries are in the
    # installed distribution, not in this folder. Look through every distribution of that name, since the checkout's
    # own nag_cuda.egg-info is found first and lists no library.
    files = [f for dist in metadata.distributions(name="nag_cuda") for f in dist.files or []]
    found = [f for f in files if f.parent.name == "nag_cuda" and f.name.startswith("_C.") and f.suffix == ".so"]
    if not found:
        raise ImportError("nag_cuda's compiled extension (nag_cuda._C) is missing: install the package with "
                          "`pip install --no-build-isolation .`")
    return Path(found[0].locate())


def _load(name: str, library: Path):
    """The library file loaded as the submodule nag_cuda.<name>: sys.modules holds it, where _C's import of the
    kernels' libraries finds it, also when the file is not in this package's folder."""
    spec = importlib.util.spec_from_file_location(f"{__package__}.{name}", library)
    module = importlib.util.module_from_spec(spec)  # (runs the library's PyInit)
    spec.loader.exec_module(module)
    sys.modules[spec.name] = module
    setattr(sys.modules[__package__], name, module)
    return module


def _load_extension():
    """The compiled module nag_cuda._C (importing it registers torch.ops.nag_cuda), after the kernels' libraries it
    runs, from its folder: nag_cuda._kernels, and nag_cuda._kernels_cuda where there is one and torch has CUDA."""
    library = _library()
    check_built_for(library)  # (only _C is tied to one torch: the kernels' libraries are on its stable ABI)
    for name in ("_kernels", "_kernels_cuda") if torch.version.cuda else ("_kernels",):
        found = sorted(library.parent.glob(f"{name}.*so"))
        if found:
            _load(name, found[0])
    return _load("_C", library)  # (it raises ImportError where a kernels' library it needs is not loaded)


_C = _load_extension()

from .reference import grad_norm_partial_reference, nag_step_reference

ops = torch.ops.nag_cuda


@torch.library.register_fake("nag_cuda::nag_step_")
@torch.library.register_fake("nag_cuda::nag_step_.tensor_lr")
def _nag_step_fake(params, grads, momentum_buffers, is_first, lr, momentum, weight_decay, maximize, *,
                   grad_scale=None, found_inf=None, master_params=None, sr_seed=None, grad_coef=None):
    # In place on params, momentum_buffers, master_params (and grads, when unscaling): no output to describe. The
    # arguments are checked as the real kernels check them, so meta and fake tensors fail where real ones would.
    ops._check_step(params, grads, momentum_buffers, is_first, lr if isinstance(lr, torch.Tensor) else None,
                    grad_scale=grad_scale, found_inf=found_inf, master_params=master_params,
                    stochastic=sr_seed is not None, grad_coef=grad_coef)


@torch.library.register_fake("nag_cuda::grad_norm_partial")
def _grad_norm_partial_fake(grads, norm_type, *, grad_scale=None):
    # (also what a list of real and meta tensors dispatches to: refused, as the kernels refuse mixed devices)
    for i, grad in enumerate(grads):
        if grad.device != grads[0].device:
            raise RuntimeError(f"grad_norm_partial: grads[{i}] is on {grad.device}, grads[0] on {grads[0].device}; "
                               "call once per device")
    return torch.empty((), dtype=torch.float32, device=grads[0].device if grads else "cpu")


def build_info() -> dict:
    """What the compiled extension contains: {'cpu': True, 'cuda': bool, 'cuda_archs': [80, 90, ...]}."""
    parts = dict(part.partition("=")[::2] for part in ops._build_info().split(";"))
    cuda = "cuda" in parts
    archs = [int(a) // 10 for a in parts["cuda"].split(",") if a.strip().isdigit()] if cuda else []
    return {"cpu": "cpu" in parts, "cuda": cuda, "cuda_archs": archs}


_KERNEL_DEVICES = {"cpu"} | ({"cuda"} if build_info()["cuda"] else set())
_warned = set()


def step_function(device: torch.device, tensor_lr: bool = False):
    """The compiled op where this build has a kernel for `device`, else the pure-PyTorch reference (with a warning).

    tensor_lr: the op's overload that takes the learning rate as a tensor and reads it on the device.
    """
    if device.type in _KERNEL_DEVICES:
        return ops.nag_step_.tensor_lr if tensor_lr else ops.nag_step_.default
    if device.type not in _warned:
        _warned.add(device.type)
        warnings.warn(
            f"nag_cuda has no compiled kernel for {device.type} tensors in this build; FusedNAG uses its slower "
            "pure-PyTorch reference implementation there",
            stacklevel=3,
        )
    return nag_step_reference


def grad_norm_function(device: torch.device):
    """max_grad_norm: the op that reduces one device's grads (ops.grad_norm_partial), or its reference where this
    build has no kernel for `device`."""
    return ops.grad_norm_partial if device.type in _KERNEL_DEVICES else grad_norm_partial_reference
