"""setup.py where torch does not import (as under pip's default build isolation): a clear message that says what to
run, not a traceback."""

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
