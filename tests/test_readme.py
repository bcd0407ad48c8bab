"""The code blocks of README.md, docs/*.md and examples/README.md run as written, and each says how CI runs it.

Every fenced block names its language (```text for output), and every ```python or ```bash block is preceded, on
the line before its fence, by a marker:

- `<!-- ci: python -->`: this test runs it, in this process, from the repository root;
- `<!-- ci: python, own process -->`: the same, in a fresh Python process (for code with global state, such as a
  process group);
- `<!-- ci: python, needs PKG -->`: in a fresh process, where PKG imports (CI's stage 2 installs Lightning,
  transformers, accelerate and timm), and skipped elsewhere;
- `<!-- ci: NAME -->` (README.md only, ```bash): `.ci/run` runs it as `readme_block NAME`;
- `<!-- ci: skip: REASON -->`: not run, for the reason given.
"""

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "README.md"]
CODE = {"python", "py", "bash", "sh", "shell", "console", "zsh"}  # languages whose blocks need a marker
MARKER = re.compile(r"^<!-- ci: (.*?) -->$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")
# The names .ci/run runs with readme_block (from README.md only: that is where the function reads).
CI_NAMES = set(re.findall(r"^readme_block ([\w-]+)\s*$", (ROOT / ".ci" / "run").read_text(), flags=re.M))


@dataclass
class Block:
    page: Path
    number: int  # 1-based, counting every fenced block of the page
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None  # the text of the `<!-- ci: ... -->` on the line before the fence

    @property
    def id(self):
        return f"{self.page.relative_to(ROOT).as_posix()}#{self.number}"


def blocks(page):
    """The fenced blocks of a page, and the markers that no block follows (as (line, marker) pairs)."""
    lines = page.read_text().splitlines()
    found, orphans, i, number = [], [], 0, 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        marker = MARKER.match(line.strip())
        if marker:
            following = lines[i + 1] if i + 1 < len(lines) else ""
            if not FENCE.match(following):
                orphans.append((i + 1, marker.group(1)))
        if not fence:
            i += 1
            continue
        indent, chars, info = fence.groups()
        number += 1
        start, body = i, []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{re.escape(chars[0])}{{{len(chars)},}}\s*$", lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{page.relative_to(ROOT)}:{start + 1}: a fenced block that never closes")
        i += 1  # the closing fence
        before = MARKER.match(lines[start - 1].strip()) if start else None
        found.append(Block(page, number, start + 1, info.strip().split()[0] if info.strip() else "",
                           "\n".join(body) + "\n", before.group(1) if before else None))
    return found, orphans


def marker_problems(block):
    """What is wrong with a block's marker, as a list of sentences (empty when nothing is)."""
    where = f"{block.page.relative_to(ROOT)}:{block.line} (block {block.number})"
    if not block.lang:
        return [f"{where}: the fence names no language (use ```text for output)"]
    marker = block.marker
    if marker is None:
        if block.lang in CODE:
            return [f"{where}: a ```{block.lang} block with no `<!-- ci: ... -->` marker on the line before it"]
        return []
    if block.lang not in CODE:
        return [f"{where}: a marker before a ```{block.lang} block, which is not run"]
    if marker.startswith("skip:"):
        return [] if marker[len("skip:"):].strip() else [f"{where}: `skip:` without a reason"]
    if marker.split(",")[0].strip() == "python":
        if block.lang not in ("python", "py"):
            return [f"{where}: a python marker before a ```{block.lang} block"]
        options = [o.strip() for o in marker.split(",")[1:]]
        bad = [o for o in options if o != "own process" and not re.fullmatch(r"needs [\w.]+", o)]
        return [f"{where}: unknown option(s) {bad} in `{marker}`"] if bad else []
    if marker in CI_NAMES:
        problems = []
        if block.page != ROOT / "README.md":
            problems.append(f"{where}: `{marker}` is run by .ci/run's readme_block, which reads README.md only")
        if block.lang != "bash":
            problems.append(f"{where}: readme_block runs ```bash blocks, not ```{block.lang}")
        return problems
    return [f"{where}: unknown marker `{marker}` (not `python...`, `skip: ...`, nor a name .ci/run runs: "
            f"{sorted(CI_NAMES)})"]


BLOCKS = [b for page in PAGES for b in blocks(page)[0]]
RUN = [b for b in BLOCKS if b.marker and b.marker.split(",")[0].strip() == "python"]


def test_pages_exist_and_have_examples():
    assert all(page.exists() for page in PAGES)
    assert {b.page for b in RUN} >= {ROOT / "README.md"}
    assert len(PAGES) > 10  # README, the docs/ pages, examples/README.md


def test_every_code_block_says_how_ci_runs_it():
    problems = [p for b in BLOCKS for p in marker_problems(b)]
    for page in PAGES:
        problems += [f"{page.relative_to(ROOT)}:{line}: marker `{m}` with no fenced block on the next line"
                     for line, m in blocks(page)[1]]
    assert not problems, "\n".join(problems)


def test_every_block_ci_runs_by_name_is_in_the_readme_once():
    named = [b.marker for b in BLOCKS if b.marker in CI_NAMES]
    assert sorted(named) == sorted(CI_NAMES), f".ci/run runs {sorted(CI_NAMES)}; README.md marks {sorted(named)}"


def test_the_marker_check_catches_what_it_should(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 1\n```\n\n<!-- ci: skip: -->\n```bash\nls\n```\n\n```\nno language\n```\n\n"
                    "<!-- ci: bench -->\n```bash\nls\n```\n\n<!-- ci: python, fast -->\n```python\nx = 1\n```\n"
                    "<!-- ci: python -->\n\n<!-- ci: skip: fine -->\n```bash\nls\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found, orphans = blocks(page)
    problems = [p for b in found for p in marker_problems(b)]
    assert len(problems) == 5, problems  # no marker, skip without reason, no language, bench outside README, option
    assert orphans == [(23, "python")]


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_doc_example_runs(block, monkeypatch):
    options = [o.strip() for o in block.marker.split(",")[1:]]
    needs = [o.split()[1] for o in options if o.startswith("needs ")]
    for package in needs:
        pytest.importorskip(package, reason=f"{block.id} needs {package}")
    code = "\n" * block.line + block.code  # so that a traceback's line numbers are the page's
    if options:  # in a process of its own, as a user runs it: frameworks and process groups keep global state
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        return
    monkeypatch.chdir(ROOT)
    exec(compile(code, str(block.page), "exec"), {"__name__": "__main__"})
