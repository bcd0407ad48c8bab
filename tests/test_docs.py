"""Every relative link of the documentation points at a file that exists and, with a #fragment, at a heading of it.

Pages: README.md, docs/*.md, examples/README.md, benchmarks/NOTES.md. A link is `[text](path)`, `[text](path#anchor)`,
`[text](#anchor)` or an image `![alt](path)`, outside code blocks and inline code; links with a scheme (https:, mailto:)
are not checked. An anchor must be a heading's slug as GitHub makes it: the heading's text, lowercased, with every
character that is not a letter, digit, space, `-` or `_` removed and each space made `-`; a repeated slug gets `-1`,
`-2`, … in order.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "README.md",
         ROOT / "benchmarks" / "NOTES.md"]
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")


def prose(text):
    """The page's lines with fenced blocks blanked (so line numbers stay), inline code and HTML comments removed."""
    out, fence = [], None
    for line in text.splitlines():
        opening = re.match(r"^\s*(`{3,}|~{3,})", line)
        if fence is None and opening:
            fence = opening.group(1)
            out.append("")
        elif fence is not None:
            if re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", line):
                fence = None
            out.append("")
        else:
            out.append(re.sub(r"<!--.*?-->", "", re.sub(r"(`+)(?:(?!\1).)+?\1", "", line)))
    return out


def slug(heading):
    """GitHub's anchor for a heading's markdown text."""
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", heading)  # images: gone
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page):
    """The anchors of a page's headings, duplicates numbered as GitHub numbers them."""
    seen, found = {}, set()
    for line in prose(page.read_text()):
        heading = HEADING.match(line)
        if not heading:
            continue
        base = slug(heading.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(pages, root=ROOT):
    """One sentence per link that points nowhere."""
    problems = []
    for page in pages:
        for number, line in enumerate(prose(page.read_text()), 1):
            for target in LINK.findall(line):
                if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
                    continue  # https:, mailto:, …: not checked here
                path, _, anchor = target.partition("#")
                where = f"{page.relative_to(root)}:{number}: ({target})"
                dest = page if not path else (root / path.lstrip("/") if path.startswith("/") else page.parent / path)
                if not dest.exists():
                    problems.append(f"{where}: no file {dest.resolve().relative_to(root.resolve())}"
                                    if dest.resolve().is_relative_to(root.resolve()) else f"{where}: outside the repo")
                    continue
                if anchor:
                    if dest.suffix != ".md" or dest.is_dir():
                        problems.append(f"{where}: an anchor into {dest.name}, which is not a markdown page")
                    elif anchor not in anchors(dest):
                        problems.append(f"{where}: {dest.resolve().relative_to(root.resolve())} has no heading #{anchor}")
    return problems


def test_pages_exist():
    assert all(page.exists() for page in PAGES), [p for p in PAGES if not p.exists()]


def test_every_relative_link_points_at_a_file_and_heading():
    problems = broken_links(PAGES)
    assert not problems, "\n".join(problems)


def test_slugs_are_githubs():
    assert slug("Where FusedNAG differs from torch's SGD") == "where-fusednag-differs-from-torchs-sgd"
    assert slug("CPU float16 and bfloat16 against torch 2.14.1") == "cpu-float16-and-bfloat16-against-torch-2141"
    assert slug("`torch.compile` and *CUDA graphs*") == "torchcompile-and-cuda-graphs"
    assert slug("The step, stated once: two paths") == "the-step-stated-once-two-paths"
    assert slug("One step, stated once (issue 27)") == "one-step-stated-once-issue-27"
    assert slug("max_grad_norm [docs](x.md)") == "max_grad_norm-docs"


def test_the_link_check_finds_what_is_broken(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Same\n\n## Same\n\n```bash\n# not a heading\n```\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Title\n\n"
        "[ok](docs/a.md) [ok](docs/a.md#same) [ok](docs/a.md#same-1) [ok](#title) ![ok](docs/a.md) [ok](docs/)\n"
        "[web](https://example.com/x.md#nowhere) `[code](missing.md)`\n\n"
        "```text\n[in a block](missing.md)\n```\n\n"
        "[bad](missing.md) [bad](docs/a.md#same-2) [bad](#nowhere) [bad](docs/a.md#not-a-heading)\n"
        "![bad](docs/missing.png) [bad](docs/#x)\n"
    )
    problems = broken_links([page], root=tmp_path)
    assert len(problems) == 6, "\n".join(problems)
    assert all(":10:" in p or ":11:" in p for p in problems), problems
