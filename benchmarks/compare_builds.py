"""Host µs per tensor of step() (bench_step.host_per_tensor) for two builds of nag_cuda in one run: the installed one
and another tree (e.g. a worktree of main with `python setup.py build_ext --inplace`), in fresh processes that
alternate between them, so that both see the same machine. Prints a markdown table of medians and their ratio.

    git worktree add /tmp/base main && (cd /tmp/base && python setup.py build_ext --inplace)
    python benchmarks/compare_builds.py /tmp/base --counts 2000 10000 --processes 5
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def run(tree, n):
    """bench_step.host_per_tensor for n tensors in a new process; tree: the nag_cuda to import (None: installed)."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")])
    code = (f"import json, sys, torch; sys.path.insert(0, {str(HERE)!r}); import bench_step, nag_cuda; "
            f"assert {str(tree) if tree else ''!r} in nag_cuda._ops._C.__file__, nag_cuda._ops._C.__file__; "
            f"print(json.dumps(bench_step.host_per_tensor(torch.device('cpu'), counts=({n},))))")
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env,
                          cwd="/")
    return json.loads(done.stdout.splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base", type=Path, help="the other tree (its nag_cuda/ holds a built _C)")
    parser.add_argument("--counts", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--processes", type=int, default=5, help="fresh processes per build and count")
    args = parser.parse_args(argv)
    builds = {"base": args.base.resolve(), "this": None}
    samples = {}  # (kind, method, n, build) -> [µs]
    for n in args.counts:
        for _ in range(args.processes):
            for build, tree in builds.items():
                for kind, rows in run(tree, n).items():
                    for method, row in rows.items():
                        if method.startswith("FusedNAG"):
                            samples.setdefault((kind, method, n, build), []).append(row[str(n)])
    print("| mode | method | tensors | base µs | this µs | this ÷ base |\n| --- | --- | ---: | ---: | ---: | ---: |")
    for (kind, method, n, build), values in samples.items():
        if build != "base":
            continue
        base, this = statistics.median(values), statistics.median(samples[kind, method, n, "this"])
        print(f"| {kind} | {method} | {n} | {base:.3f} | {this:.3f} | {this / base:.3f} |")


if __name__ == "__main__":
    main()
