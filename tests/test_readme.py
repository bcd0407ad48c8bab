"""The README's Python examples run as written (blocks after a `<!-- ci: python -->` line)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
# (the package it needs, code): a block after `<!-- ci: python, needs lightning -->` runs where that package imports
# (CI's stage 2 installs it) and is skipped elsewhere.
BLOCKS = re.findall(r"<!-- ci: python(?:, needs (\w+))? -->\n```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert BLOCKS


@pytest.mark.parametrize("needs, code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(needs, code):
    if needs:  # in a process of its own, as a user runs it: these frameworks keep global state (accelerate's)
        pytest.importorskip(needs)
        subprocess.run([sys.executable, "-c", code], check=True, cwd=README.parent)
        return
    exec(compile(code, str(README), "exec"), {})
