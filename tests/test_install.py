"""setup.py where torch does not import (as under pip's default build isolation): a clear message that says what to
run, not a traceback."""

import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# setup.py run with torch hidden from imports, optionally with a sys.path entry like pip's isolated build environment.
WITHOUT_TORCH = """
import runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, NoTorch())
if ISOLATED:
    sys.path.append("/tmp/pip-build-env-test/overlay")
sys.argv = ["setup.py", "--version"]
runpy.run_path("setup.py", run_name="__main__")
"""


@pytest.mark.parametrize("isolated, says", [(True, "isolated environment that has no torch"),
                                            (False, "Install torch first")], ids=["pip isolation", "no torch"])
def test_setup_without_torch_says_what_to_run(isolated, says):
    result = subprocess.run([sys.executable, "-c", f"ISOLATED = {isolated}\n" + WITHOUT_TORCH], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "pip install --no-build-isolation ." in result.stderr and says in result.stderr
    assert "Traceback" not in result.stderr


# --- finding a usable CUDA toolkit: setup.py's helpers, on fake toolkits ----------------------------------------------

@pytest.fixture
def setup_py(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.delenv("NAG_CUDA_BUILD", raising=False)
    return runpy.run_path(str(ROOT / "setup.py"), run_name="setup_helpers")  # not __main__: setup() does not run


def fake_toolkit(home, release="13.0", lib="lib"):
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    (home / lib).mkdir(parents=True)
    (home / lib / "libcudart.so").write_bytes(b"")
    return home


@pytest.mark.parametrize("lib", ["lib64", "lib", "targets/x86_64-linux/lib"])
def test_cudart_is_found_where_the_toolkit_keeps_it(setup_py, tmp_path, lib):
    home = fake_toolkit(tmp_path / "cuda", lib=lib)
    assert setup_py["cudart_dir"](str(home), fallbacks=()) == str(home / lib)


def test_cudart_from_the_nvidia_wheel_gets_a_link(setup_py, tmp_path, monkeypatch):
    wheel = tmp_path / "site" / "nvidia" / "cuda_runtime" / "lib"
    wheel.mkdir(parents=True)
    (wheel / "libcudart.so.13").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in [m for m in sys.modules if m == "nvidia" or m.startswith("nvidia.")]:
        monkeypatch.delitem(sys.modules, name)
    found = setup_py["cudart_dir"](str(tmp_path / "empty"), build_dir=tmp_path / "build", fallbacks=())
    assert found == str((tmp_path / "build").resolve())
    assert (tmp_path / "build" / "libcudart.so").resolve() == (wheel / "libcudart.so.13").resolve()


def test_cuda_build_with_a_matching_toolkit(setup_py, tmp_path):
    home = fake_toolkit(tmp_path / "cuda", release="13.0")
    assert setup_py["cuda_build"](str(home), "13.0") == (True, f"CUDA 13.0, nvcc in {home}", str(home / "lib"))


@pytest.mark.parametrize("case, says", [
    ("cpu torch", "is not a CUDA build"), ("no toolkit", "no CUDA toolkit was found"),
    ("major mismatch", "nvcc is CUDA 12.4 but torch was built with CUDA 13.0"), ("no cudart", "no libcudart.so")])
def test_no_cuda_build_says_why_and_forced_fails_with_it(setup_py, tmp_path, monkeypatch, case, says):
    home = None if case == "no toolkit" else fake_toolkit(tmp_path / "cuda", release="12.4" if case == "major mismatch"
                                                           else "13.0")
    if case == "no cudart":
        (home / "lib" / "libcudart.so").unlink()
        # (and none in the machine's own toolkit or an nvidia wheel either)
        monkeypatch.setitem(setup_py["cuda_build"].__globals__, "cudart_dir", lambda cuda_home: None)
    torch_cuda = None if case == "cpu torch" else "13.0"
    cuda, why, library = setup_py["cuda_build"](None if home is None else str(home), torch_cuda)
    assert not cuda and says in why and library is None
    monkeypatch.setenv("NAG_CUDA_BUILD", "1")
    with pytest.raises(SystemExit, match=says):
        setup_py["cuda_build"](None if home is None else str(home), torch_cuda)


# ---- the library is tied to the torch it was built against (setup.py records it; nag_cuda/_ops.py checks it) ----

def test_the_library_records_the_torch_it_was_built_against():
    import torch

    from nag_cuda import _ops

    assert _ops.built_for(Path(_ops._C.__file__)) == (torch.__version__, str(torch.version.git_version))


def test_a_library_built_for_another_torch_is_refused_before_it_loads(tmp_path):
    # A copy of the package whose stamp names another torch: importing it gives the message, not the loader's error,
    # and the library is not loaded (its ops are not registered).
    from nag_cuda import _ops

    package = tmp_path / "nag_cuda"
    shutil.copytree(ROOT / "nag_cuda", package, ignore=shutil.ignore_patterns("__pycache__", "_C.*"))
    library = Path(_ops._C.__file__)
    shutil.copy(library, package / library.name)
    (package / (library.name + ".torch-version")).write_text("2.0.0+cpu\n0123456789abcdef\n")
    code = ("import torch\ntry:\n    import nag_cuda\nexcept ImportError as e:\n    print('refused:', e)\n"
            "print('ops loaded:', hasattr(torch.ops.nag_cuda, 'nag_step_'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "refused: nag_cuda's compiled extension" in out.stdout
    assert "built against torch 2.0.0+cpu (git 0123456789ab), but torch" in out.stdout
    assert "pip install --no-build-isolation" in out.stdout
    assert "ops loaded: False" in out.stdout


def test_a_library_without_a_stamp_loads_as_before(tmp_path):
    from nag_cuda import _ops

    assert _ops.built_for(tmp_path / "_C.so") is None
    _ops.check_built_for(tmp_path / "_C.so")  # (no error)


# ---- the kernels' libraries are on torch's stable ABI (csrc/nag_kernels.h): one build serves torch 2.11 on ----------

def test_a_missing_kernels_library_is_a_clear_import_error(tmp_path):
    from nag_cuda import _ops

    package = tmp_path / "nag_cuda"
    shutil.copytree(ROOT / "nag_cuda", package, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.torch-version"))
    library = Path(_ops._C.__file__)
    for f in (library, library.with_name(library.name + ".torch-version")):
        if f.exists():
            shutil.copy(f, package / f.name)
    code = "try:\n    import nag_cuda\nexcept ImportError as e:\n    print('refused:', e)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "refused: nag_cuda: the kernels' library nag_cuda._kernels is missing" in out.stdout, out.stdout
    assert "pip install --no-build-isolation" in out.stdout


def kernel_libraries():
    import nag_cuda

    names = ["_kernels"] + (["_kernels_cuda"] if nag_cuda.build_info()["cuda"] else [])
    return [Path(getattr(nag_cuda, name).__file__) for name in names]


@pytest.mark.skipif(shutil.which("nm") is None or shutil.which("readelf") is None, reason="needs binutils")
def test_kernel_libraries_use_only_torchs_stable_abi():
    # What they call of torch must be its C shim (aoti_torch_*, torch_*): a C++ symbol of at::, c10:: or torch:: is
    # tied to one torch's build, and so is libtorch_python. Python: its limited API (the abi3 tag).
    for library in kernel_libraries():
        assert library.name.endswith(".abi3.so"), library
        undefined = subprocess.run(["nm", "-D", "--undefined-only", "--demangle", str(library)], check=True,
                                   capture_output=True, text=True).stdout
        tied = [line.strip().partition(" ")[2] for line in undefined.splitlines()
                if any(ns in line for ns in ("at::", "c10::", "torch::", "caffe2::"))]
        assert tied == [], f"{library.name} calls torch's C++ API: {tied[:10]}"
        assert re.search(r"\b(aoti_)?torch_\w+", undefined), undefined  # (what they do call: the C shim)
        needed = subprocess.run(["readelf", "-d", str(library)], check=True, capture_output=True, text=True).stdout
        assert "libtorch_python" not in needed, library.name
