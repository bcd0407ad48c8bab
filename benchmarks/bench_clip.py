"""Gradient clipping: FusedNAG(max_grad_norm=...) against clip_grad_norm_(foreach=True) followed by torch's step.

    python benchmarks/bench_clip.py            # the large sets, on CUDA when available, else CPU
    python benchmarks/bench_clip.py --quick    # smaller sets, fewer repetitions

FusedNAG reads every grad once more for the norm and clips them as its step reads them: 24 bytes per float32
parameter (20 for the step, 4 for the norm). clip_grad_norm_ reads the grads for the norm and then reads and writes
them to scale them, before a step of 20: 32 bytes. Every method runs in one process, interleaved round by round, on
the same params, grads and momentum buffers (bench_step's harness); the table gives ms per step, bytes per parameter,
GB/s and time ÷ FusedNAG's, and is written with its JSON under --out.
"""

import argparse
import datetime
import math
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402
from nag_cuda import FusedNAG  # noqa: E402

MAX_NORM = 1.0  # far under the norm of the sets' random grads: every step clips


class ClipThenStep:
    """What users run today: clip_grad_norm_(every param, MAX_NORM, foreach=True), then the optimizer's step."""

    def __init__(self, opt):
        self.opt, self.state = opt, opt.state
        self.params = [p for group in opt.param_groups for p in group["params"]]

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.params, MAX_NORM, foreach=True)
        self.opt.step()


def methods():
    def sgd(**mode):
        return lambda params: ClipThenStep(torch.optim.SGD(params, nesterov=True, **mode, **bench_step.HYPER))

    return {"FusedNAG max_grad_norm": lambda params: FusedNAG(params, **bench_step.HYPER, max_grad_norm=MAX_NORM),
            "clip_grad_norm_ + FusedNAG": lambda params: ClipThenStep(FusedNAG(params, **bench_step.HYPER)),
            "clip_grad_norm_ + torch fused": sgd(fused=True),
            "clip_grad_norm_ + torch foreach": sgd(foreach=True)}


def bytes_per_param(name, dtype):
    """The step's bytes (bench_step.bytes_per_param) plus the clipping's: one read of the grads in FusedNAG, a read
    for the norm and a read and write to scale them with clip_grad_norm_."""
    grad = torch.empty(0, dtype=dtype).element_size()
    return bench_step.bytes_per_param(dtype) + (grad if name == "FusedNAG max_grad_norm" else 3 * grad)


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="smaller sets and fewer repetitions")
    parser.add_argument("--sets", nargs="+", help="subset of the sets")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per set (default: 5 quick, 15 full)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype)
    available = {name: shapes[1 if args.quick else 0] for name, shapes in bench_step.SETS.items()}
    available = {name: make for name, make in available.items() if make is not None and name != "llama-1b"}
    chosen = args.sets or list(available)
    if unknown := [name for name in chosen if name not in available]:
        parser.error(f"unknown set(s) {unknown}; choose from {list(available)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    rounds = args.rounds or (5 if args.quick else 15)
    torch.manual_seed(0)

    per_param = {name: bytes_per_param(name, dtype) for name in methods()}
    copy_gbps = bench_step.bandwidths(device, bench_step.Clock(device), 2**30)["copy"]
    meta = dict(device=bench_step.device_name(device), torch=torch.__version__, cuda=torch.version.cuda or "none",
                python=platform.python_version(), dtype=args.dtype, max_norm=MAX_NORM,
                date=datetime.date.today().isoformat(), quick=args.quick, rounds=rounds,
                command=" ".join(["python"] + [shlex.quote(a) for a in sys.argv]))
    print(f"{meta['device']}: copy {copy_gbps:.1f} GB/s", flush=True)
    result = dict(meta=meta, copy_gbps=copy_gbps, sets=[])
    ours = "FusedNAG max_grad_norm"
    for name in chosen:
        shapes = available[name]()
        numel = sum(math.prod(s) for s in shapes)
        copies = max(1, math.ceil(2 * bench_step.cache_bytes(device) / (numel * per_param[ours] * 3 / 5)))
        data = bench_step.build_copies(shapes, device, dtype, copies)
        runs = {m: bench_step.make_optimizers(make, data, own_state=False) for m, make in methods().items()}
        samples = bench_step.time_interleaved(runs, device, rounds, 0.02 if args.quick else 0.1, warmup=3)
        base = statistics.median(samples[ours])
        entry = dict(name=name, tensors=len(shapes), params=numel, methods={})
        for m, s in samples.items():
            sec = statistics.median(s)
            gbps = numel * per_param[m] / sec / 1e9
            entry["methods"][m] = dict(ms=sec * 1e3, bytes_per_param=per_param[m], gbps=gbps,
                                       pct_copy=100 * gbps / copy_gbps, vs_fusednag=sec / base)
        result["sets"].append(entry)
        print(f"{name}: " + ", ".join(f"{m} {r['ms']:.3f} ms ({r['vs_fusednag']:.2f}x)"
                                      for m, r in entry["methods"].items()), flush=True)
        del runs, data

    lines = [f"Device: {meta['device']}; torch {meta['torch']}, CUDA {meta['cuda']}, {meta['dtype']}, {meta['date']}",
             f"Command: `{meta['command']}`", f"Copy bandwidth (read + write, 1 GiB): {copy_gbps:.1f} GB/s", "",
             "| set | tensors | method | B/param | ms/step | GB/s | % of copy | time ÷ FusedNAG max_grad_norm |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for s in result["sets"]:
        for m, r in s["methods"].items():
            lines.append(f"| {s['name']} | {s['tensors']} | {m} | {r['bytes_per_param']} | {r['ms']:.3f} | "
                         f"{r['gbps']:.1f} | {r['pct_copy']:.0f}% | {r['vs_fusednag']:.2f} |")
    table = "\n".join(lines)
    print("\n" + table)
    stem = bench_step.save(args.out, f"{device.type} {meta['device']} {args.dtype} clip{' quick' if args.quick else ''}",
                           result, table)
    print(f"\nwrote {stem}.json, {stem}.md in {args.out}")
    return result


if __name__ == "__main__":
    main()
