"""Time one optimizer step of FusedNAG against torch.optim.SGD(nesterov=True) and the memory-bandwidth limit.

    python benchmarks/bench_step.py            # every set, on CUDA when available, else CPU
    python benchmarks/bench_step.py --quick    # smaller sets, fewer repetitions: under a minute on 2 CPU cores

Methods: torch SGD for-loop (foreach=False), foreach, fused; FusedNAG; apex FusedSGD when importable (CUDA); and
FusedNAG's low-precision modes for the dtype (momentum_dtype, master_weights, stochastic_rounding), which move other
numbers of bytes per parameter (bytes_per_param below) and keep their own state.
All methods run in one process, interleaved round by round, so their ratios are comparable even on a noisy machine.
Every method steps the same parameter, gradient and momentum tensors (each optimizer's state is pointed at one shared
set of buffers): the work per step is identical, and memory holds one copy of the state instead of one per method.

Per set it reports the median ms per step, the effective bandwidth (bytes per parameter x parameters / time, with
20 B/param for fp32: read p, g, buf, write p, buf; each mode its own), that as a % of the device's copy bandwidth
measured in the same run (the roofline: no method can beat its bytes at that bandwidth),
and each method's time / FusedNAG's. It also measures the host-side cost of step() and the memory a steady-state step
allocates, then writes a markdown table, JSON and a PNG chart under --out.
"""

import argparse
import datetime
import json
import math
import platform
import random
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from nag_cuda import FusedNAG

HYPER = dict(lr=1e-3, momentum=0.9, weight_decay=1e-4)  # weight decay on: the common case, and it costs foreach a pass


# --- parameter sets: shapes only, built with plain torch -------------------------------------------------------------

def resnet50_shapes():
    try:  # torchvision's own model where it imports (it does not on every machine)
        import torchvision

        with torch.device("meta"):
            return [tuple(p.shape) for p in torchvision.models.resnet50().parameters()]
    except Exception:
        pass
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for i in range(blocks):  # bottleneck: 1x1, 3x3, 1x1 (x4) convs, each with batch-norm weight and bias
            shapes += [(width, inplanes, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if i == 0:
                shapes += [(4 * width, inplanes, 1, 1), (4 * width,), (4 * width,)]
            inplanes = 4 * width
    return shapes + [(1000, 2048), (1000,)]


def gpt2_small_shapes(layers=12, d=768, vocab=50257, context=1024):
    shapes = [(vocab, d), (context, d)]  # token and position embeddings (the LM head is tied to the first)
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),  # ln_1, attention qkv and projection
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, MLP
    return shapes + [(d,), (d,)]


def llama_1b_shapes(layers=16, d=2048, ffn=8192, kv=512, vocab=128256):
    shapes = [(vocab, d)]  # Llama-3.2-1B-like: tied embeddings, grouped-query attention
    for _ in range(layers):
        shapes += [(d,), (d, d), (kv, d), (kv, d), (d, d), (d,), (ffn, d), (ffn, d), (d, ffn)]
    return shapes + [(d,)]


SETS = {  # name: (shapes in the full run, shapes with --quick)
    "resnet50": (resnet50_shapes, resnet50_shapes),
    "gpt2-124m": (gpt2_small_shapes, lambda: gpt2_small_shapes(layers=2)),
    "llama-1b": (llama_1b_shapes, None),
    "2000x64x64": (lambda: [(64, 64)] * 2000, lambda: [(64, 64)] * 2000),
    "1x256M": (lambda: [(2**28,)], None),
    "1x16M": (None, lambda: [(2**24,)]),
}


# --- the methods -----------------------------------------------------------------------------------------------------

# FusedNAG's low-precision modes worth timing for params of each dtype: method name -> options.
MODES = {
    torch.float32: {"FusedNAG bf16 momentum": dict(momentum_dtype=torch.bfloat16)},
    torch.float16: {"FusedNAG fp32 momentum": dict(momentum_dtype=torch.float32),
                    "FusedNAG master weights": dict(master_weights=True)},
    torch.bfloat16: {"FusedNAG fp32 momentum": dict(momentum_dtype=torch.float32),
                     "FusedNAG master weights": dict(master_weights=True),
                     "FusedNAG stochastic rounding": dict(stochastic_rounding=True, sr_seed=0)},
}


def bytes_per_param(dtype, options=None):
    """The fewest bytes a step moves per parameter: each tensor read once and written once where it changes."""
    options = options or {}
    size = torch.empty(0, dtype=dtype).element_size()
    master = options.get("master_weights", False)
    buf = torch.empty(0, dtype=options.get("momentum_dtype") or (torch.float32 if master else dtype)).element_size()
    if master:  # read grad, write param; read + write buffer and the float32 master
        return 2 * size + 2 * buf + 8
    return 3 * size + 2 * buf  # read grad; read + write param and buffer


def methods(device, dtype):
    def sgd(**mode):
        return lambda params: torch.optim.SGD(params, nesterov=True, **mode, **HYPER)

    found = {"FusedNAG": lambda params: FusedNAG(params, **HYPER),
             "torch fused": sgd(fused=True), "torch foreach": sgd(foreach=True), "torch for-loop": sgd(foreach=False)}
    for name, options in MODES.get(dtype, {}).items():
        found[name] = lambda params, options=options: FusedNAG(params, **HYPER, **options)
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedSGD

            found["apex FusedSGD"] = lambda params: FusedSGD(params, nesterov=True, **HYPER)
        except ImportError:
            pass
    return found


class Clock:
    """Times one call on the device: CUDA events on CUDA (device time, median-friendly), wall clock on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.pending = []

    def time(self, fn):
        if not self.cuda:
            start = time.perf_counter()
            fn()
            self.pending.append(time.perf_counter() - start)
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        self.pending.append((start, end))

    def collect(self):
        """Seconds per timed call, in order; clears the pending list."""
        if self.cuda:
            torch.cuda.synchronize()
            out = [s.elapsed_time(e) / 1e3 for s, e in self.pending]
        else:
            out = list(self.pending)
        self.pending = []
        return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bandwidths(device, clock, nbytes):
    """GB/s (bytes read + bytes written, median of 20) of dst.copy_(src) and of x.mul_(1) in place.

    The copy is the reference for "% of copy". On CPUs a copy also reads every destination line before writing it
    (write-allocate), which a step does not need (it reads p and buf before writing them), so the in-place figure
    is the closer ceiling there; on GPUs the two agree.
    """
    src = torch.empty(nbytes // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    out = {}
    for name, fn in (("copy", lambda: dst.copy_(src)), ("in_place", lambda: src.mul_(1.0))):
        for _ in range(3):
            fn()
        for _ in range(20):
            clock.time(fn)
        out[name] = 2 * nbytes / statistics.median(clock.collect()) / 1e9
    return out


def cache_bytes(device):
    """Last-level cache size: a set smaller than twice this is rotated over several copies so that it is not timed hot."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text.rstrip("K")) * 1024
    except (OSError, ValueError):
        return 32 * 2**20


def build_copies(shapes, device, dtype, copies):
    """`copies` independent (params, momentum buffers) sets with random non-zero values and gradients."""
    out = []
    for _ in range(copies):
        params = []
        for shape in shapes:
            p = torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype).uniform_(-1, 1))
            p.grad = torch.empty_like(p).uniform_(-1, 1)
            params.append(p)
        out.append((params, [torch.empty_like(p).uniform_(-1, 1) for p in params]))
    return out


def make_optimizers(make, copies, own_state):
    """One optimizer per copy, its momentum state pointed at the copy's shared buffers (so every step is steady state).
    own_state: a FusedNAG mode with state of other dtypes, which makes it in a first step."""
    opts = []
    for params, bufs in copies:
        opt = make(params)
        if own_state:
            opt.step()
        else:
            for p, buf in zip(params, bufs):
                opt.state[p]["momentum_buffer"] = buf
        opts.append(opt)
    return opts


def time_interleaved(runs, device, rounds, target_s, warmup):
    """Seconds per step of each run, {name: [samples]}: rounds of every method in turn, in a shuffled order."""
    clock = Clock(device)
    steps = {}
    for name, opts in runs.items():  # warm-up, and how many steps make about target_s per round
        for i in range(warmup):
            opts[i % len(opts)].step()
        sync(device)
        start = time.perf_counter()
        opts[0].step()
        sync(device)
        steps[name] = max(1, min(50, int(target_s / max(time.perf_counter() - start, 1e-6))))
    samples = {name: [] for name in runs}
    order = random.Random(0)
    for _ in range(rounds):
        # A fresh order each round: a method that always ran right after the same one would inherit its after-effects
        # (foreach and the for-loop free large temporaries).
        for name in order.sample(list(runs), len(runs)):
            opts = runs[name]
            for i in range(steps[name]):
                clock.time(opts[i % len(opts)].step)
            samples[name] += clock.collect()
    return samples


@torch.no_grad()  # as in step(): the ops update leaves that require grad
def host_overhead(runs, copies, device, reps):
    """Host-side seconds per step() for FusedNAG and torch fused, {name: seconds} (medians, interleaved).

    CUDA: the wall time of the step() call itself, which only launches (the queue is drained before each call).
    CPU: step() runs the kernel too, so the kernel op is also called alone on the same lists and subtracted. FusedNAG's
    step() reads its lists in C++, which costs less than the op's call from Python: its figure can be below 0.
    """
    params, bufs = copies[0]
    grads = [p.grad for p in params]
    ops = {
        "FusedNAG": lambda: torch.ops.nag_cuda.nag_step_(params, grads, bufs, [False] * len(params), HYPER["lr"],
                                                         HYPER["momentum"], HYPER["weight_decay"], False),
        "torch fused": lambda: torch._fused_sgd_(params, grads, bufs, weight_decay=HYPER["weight_decay"],
                                                 momentum=HYPER["momentum"], lr=HYPER["lr"], dampening=0.0,
                                                 nesterov=True, maximize=False, is_first_step=False),
    }
    ops = {name: op for name, op in ops.items() if name in runs}
    calls = {name: runs[name][0].step for name in ops}
    if device.type != "cuda":
        calls.update({f"{name} kernel op": op for name, op in ops.items()})
    samples = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            sync(device)
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    sync(device)
    median = {name: statistics.median(s) for name, s in samples.items()}
    if device.type == "cuda":
        return {name: median[name] for name in ops}
    return {name: median[name] - median[f"{name} kernel op"] for name in ops}


HOST_COUNTS = (100, 2000, 10000)


def host_methods():
    """The methods of host_per_tensor: name -> (make optimizer, param dtype, under GradScaler)."""
    def sgd(**mode):
        return lambda params: torch.optim.SGD(params, nesterov=True, **mode, **HYPER)

    ours = {"FusedNAG": ({}, torch.float32, False), "FusedNAG GradScaler": ({}, torch.float32, True),
            "FusedNAG bf16": ({}, torch.bfloat16, False)}
    ours.update({f"{name} (bf16)": (options, torch.bfloat16, False)
                 for name, options in MODES[torch.bfloat16].items()})
    found = {name: (lambda params, o=options: FusedNAG(params, **HYPER, **o), dtype, amp)
             for name, (options, dtype, amp) in ours.items()}
    found.update({"torch fused": (sgd(fused=True), torch.float32, False),
                  "torch fused GradScaler": (sgd(fused=True), torch.float32, True),
                  "torch foreach": (sgd(foreach=True), torch.float32, False)})
    return found


@torch.no_grad()
def host_per_tensor(device, counts=HOST_COUNTS, reps=15, rounds=3):
    """Host µs per tensor of step() with n params of one element each, so that a step costs the host's work per
    tensor (on CPU the kernels' share is a few ns per tensor); one CPU thread. {"back-to-back": {method: {n: µs}},
    "interleaved": ...}, medians:
      back-to-back: `reps` steps of one optimizer in a row (the issue's measurement), in `rounds` rounds that
        alternate the methods;
      interleaved: each step after the other methods' steps, so that it starts with their data in the caches, as a
        step in training starts after forward and backward.
    "GradScaler": step() with grad_scale and found_inf set, as torch.amp.GradScaler.step() sets them (the scaler's
    own inf check before that is the same for every optimizer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {"back-to-back": {name: {} for name in host_methods()}, "interleaved": {name: {} for name in host_methods()}}
    try:
        for n in counts:
            opts = {}
            for name, (make, dtype, amp) in host_methods().items():
                params = [torch.nn.Parameter(torch.rand(1, device=device, dtype=dtype)) for _ in range(n)]
                for p in params:
                    p.grad = torch.rand_like(p)
                opt = make(params)
                if amp:
                    opt.grad_scale = torch.ones((), device=device)
                    opt.found_inf = torch.zeros((), device=device)
                for _ in range(3):
                    opt.step()
                opts[name] = opt
            order = random.Random(n)

            def timed(name):
                sync(device)
                start = time.perf_counter()
                opts[name].step()
                return time.perf_counter() - start

            back, mixed = {name: [] for name in opts}, {name: [] for name in opts}
            for _ in range(rounds):
                for name in order.sample(list(opts), len(opts)):
                    back[name] += [timed(name) for _ in range(reps)]
            for _ in range(reps):
                for name in order.sample(list(opts), len(opts)):
                    mixed[name].append(timed(name))
            sync(device)
            for kind, samples in (("back-to-back", back), ("interleaved", mixed)):
                for name, seconds in samples.items():
                    out[kind][name][n] = 1e6 * statistics.median(seconds) / n
    finally:
        torch.set_num_threads(threads)
    return out


GROUP_COUNTS = (100, 2000)


@torch.no_grad()
def host_per_group(device, counts=GROUP_COUNTS, reps=15, rounds=3):
    """Host µs per param group of step() with n groups of one one-element param each (layer-wise settings), one CPU
    thread: {"method, same lr" / "method, lr per group": {n: µs}}, medians of `reps` steps back-to-back in `rounds`
    rounds that alternate the methods. With the same settings, FusedNAG's groups share one op call per device; with a
    different lr each, every group is one op call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    makers = {"FusedNAG": lambda groups: FusedNAG(groups, **HYPER),
              "torch fused": lambda groups: torch.optim.SGD(groups, nesterov=True, fused=True, **HYPER),
              "torch foreach": lambda groups: torch.optim.SGD(groups, nesterov=True, foreach=True, **HYPER)}
    out = {}
    try:
        for n in counts:
            opts = {}
            for name, make in makers.items():
                for setting, lr in (("same lr", lambda i: HYPER["lr"]),
                                    ("lr per group", lambda i: HYPER["lr"] * (1 + i / n))):
                    params = [torch.nn.Parameter(torch.rand(1, device=device)) for _ in range(n)]
                    for p in params:
                        p.grad = torch.rand_like(p)
                    opt = make([{"params": [p], "lr": lr(i)} for i, p in enumerate(params)])
                    for _ in range(3):
                        opt.step()
                    opts[f"{name}, {setting}"] = opt
            order = random.Random(n)
            samples = {name: [] for name in opts}
            for _ in range(rounds):
                for name in order.sample(list(opts), len(opts)):
                    for _ in range(reps):
                        sync(device)
                        start = time.perf_counter()
                        opts[name].step()
                        samples[name].append(time.perf_counter() - start)
            sync(device)
            for name, seconds in samples.items():
                out.setdefault(name, {})[n] = 1e6 * statistics.median(seconds) / n
    finally:
        torch.set_num_threads(threads)
    return out


def group_markdown(groups):
    counts = list(next(iter(groups.values())))
    lines = ["Host µs per param group of step() (one param of one element per group, one CPU thread, back-to-back), "
             "and in brackets torch fused's time ÷ this method's:", "",
             "| method | " + " | ".join(f"{n} groups" for n in counts) + " |", "| --- |" + " ---: |" * len(counts)]
    for name, row in groups.items():
        fused = groups["torch fused, " + name.split(", ")[1]]
        lines.append(f"| {name} | " + " | ".join(f"{row[n]:.2f} ({fused[n] / row[n]:.1f}x)" for n in counts) + " |")
    return "\n".join(lines)


def host_per_tensor_fresh(device, counts=HOST_COUNTS, processes=1):
    """host_per_tensor with each count in a new process: objects made after others were freed land scattered over the
    heap, which made the first optimizer built for the next count up to 2x slower than the same one built first.
    processes > 1: each count in that many processes, and each method's median over them (on a shared VM one process
    can read 1.5x another's)."""
    runs = {}
    for n in counts:
        for _ in range(processes):
            result = in_fresh_process(f"host_per_tensor(torch.device({str(device)!r}), counts=({n},))")
            for kind, rows in result.items():
                for name, row in rows.items():
                    runs.setdefault(kind, {}).setdefault(name, {}).setdefault(n, []).append(row[str(n)])
    return {kind: {name: {n: statistics.median(us) for n, us in row.items()} for name, row in rows.items()}
            for kind, rows in runs.items()}


def in_fresh_process(call):
    """The JSON result of `bench_step.<call>`, run in a new Python process."""
    code = (f"import json, sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_step; "
            f"print(json.dumps(bench_step.{call}))")
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.splitlines()[-1])


def host_markdown(host):
    counts = list(next(iter(host["back-to-back"].values())))
    lines = ["Host µs per tensor of step() (params of one element, one CPU thread), back-to-back / interleaved (see "
             "host_per_tensor), and in brackets torch fused's time ÷ this method's:", "",
             "| method | " + " | ".join(f"{n} tensors" for n in counts) + " |", "| --- |" + " ---: |" * len(counts)]
    for name in host["back-to-back"]:
        fused = "torch fused GradScaler" if "GradScaler" in name else "torch fused"
        cells = [" / ".join(f"{host[k][name][n]:.3f} ({host[k][fused][n] / host[k][name][n]:.1f}x)"
                            for k in ("back-to-back", "interleaved")) for n in counts]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def host_targets(host):
    """Issue 13: at most 0.25 µs per tensor, and 8x less than torch fused, at 2000 and 10000 tensors."""
    lines = []
    for kind in ("back-to-back", "interleaved"):
        for name, row in host[kind].items():
            if not name.startswith("FusedNAG"):
                continue
            fused = host[kind]["torch fused GradScaler" if "GradScaler" in name else "torch fused"]
            for n in (2000, 10000):
                if n in row:
                    us, ratio = row[n], fused[n] / row[n]
                    lines.append(f"- {name}, {n} tensors, {kind}: {us:.3f} µs per tensor "
                                 f"({'met' if us <= 0.25 else 'MISSED'}: ≤ 0.25), {ratio:.1f}x less than torch fused "
                                 f"({'met' if ratio >= 8 else 'MISSED'}: ≥ 8)")
    return lines


def step_allocations(opt, device):
    """Bytes allocated during one steady-state step: the peak above the starting point on CUDA; on CPU the sum of all
    allocations, from the profiler (which sees every allocation ATen makes)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        opt.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


# --- the report ------------------------------------------------------------------------------------------------------

def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def markdown(result):
    meta = result["meta"]
    lines = [f"Device: {meta['device']}; torch {meta['torch']}, CUDA {meta['cuda']}, {meta['dtype']}, {meta['date']}",
             f"Command: `{meta['command']}`",
             f"Measured bandwidth (bytes read + written, 1 GiB): copy_ {result['copy_gbps']:.1f} GB/s, "
             f"in-place mul_ {result['in_place_gbps']:.1f} GB/s", "",
             "| set | tensors | params | method | B/param | ms/step | roofline ms | GB/s | % of copy | time ÷ FusedNAG |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in result["sets"]:
        for i, (name, r) in enumerate(s["methods"].items()):
            head = f"| {s['name']} | {s['tensors']} | {s['params'] / 1e6:.1f}M" if i == 0 else "| | |"
            lines.append(f"{head} | {name} | {r['bytes_per_param']} | {r['ms']:.3f} | {r['roofline_ms']:.3f} "
                         f"| {r['gbps']:.0f} | {r['pct_copy']:.0f}% | {r['vs_fusednag']:.2f} |")
    host = result["host_overhead_us"]
    lines += ["", f"Host-side cost of step() on {result['host_overhead_set']} (µs): "
              + ", ".join(f"{name} {us:.0f}" for name, us in host.items()),
              "", "Memory allocated during a steady-state step (bytes): "
              + ", ".join(f"{name} {b}" for name, b in result["step_allocations"].items()),
              "", "Targets (benchmark issue):"] + result["targets"]
    return "\n".join(lines)


def target_lines(result, cuda):
    """The issue's targets, each with the measured value and whether this run met it."""
    checks = []
    for s in result["sets"]:
        r = s["methods"]
        if "torch fused" in r:
            need = 1.5 if cuda and s["tensors"] >= 2000 else 1.0
            checks.append((f"{s['name']}: torch fused ÷ FusedNAG ≥ {need}", r["torch fused"]["vs_fusednag"], need))
        if "torch foreach" in r:
            need = 2.0 if cuda else 1.5
            checks.append((f"{s['name']}: torch foreach ÷ FusedNAG ≥ {need}", r["torch foreach"]["vs_fusednag"], need))
        if cuda and result["meta"]["dtype"] == "float32" and s["params"] >= 10**8:
            checks.append((f"{s['name']}: FusedNAG % of copy bandwidth ≥ 90", r["FusedNAG"]["pct_copy"], 90))
    host = result["host_overhead_us"]
    if "torch fused" in host:
        # A difference, not a ratio: on CPU FusedNAG's step() can cost less than its op called from Python (below 0).
        checks.append(("host cost of step(): torch fused − FusedNAG ≥ 0 µs", host["torch fused"] - host["FusedNAG"], 0.0))
    return [f"- {'met' if value >= need else 'MISSED'}: {text} (measured {value:.2f})" for text, value, need in checks]


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [s["name"] for s in result["sets"]]
    names = list(result["sets"][0]["methods"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(sets))]
        left.bar(xs, [s["methods"][name]["gbps"] for s in result["sets"]], width, label=name)
        right.bar(xs, [s["methods"][name]["vs_fusednag"] for s in result["sets"]], width, label=name)
    left.axhline(result["copy_gbps"], color="black", linestyle="--", label="copy bandwidth")
    left.axhline(result["in_place_gbps"], color="gray", linestyle=":", label="in-place bandwidth")
    left.set_ylabel("effective GB/s (each method's own bytes per param)")
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_ylabel("time ÷ FusedNAG time (higher: FusedNAG faster)")
    for ax in (left, right):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sets))], sets, rotation=15)
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=len(names) + 2, fontsize=8)
    fig.suptitle(f"{result['meta']['device']}, torch {result['meta']['torch']}, {result['meta']['dtype']}")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="smaller sets and fewer repetitions (CI-sized)")
    parser.add_argument("--sets", nargs="+", help="subset of the sets to run (default: all of the mode's sets)")
    parser.add_argument("--methods", nargs="+", help="subset of the methods (default: all; FusedNAG always runs)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per set (default: 5 quick, 15 full)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="where results go")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG chart (no matplotlib needed)")
    parser.add_argument("--host", action="store_true",
                        help="only the host cost per tensor (100/2000/10000 tensors) and per param group (100/2000)")
    parser.add_argument("--processes", type=int, default=3,
                        help="--host: fresh processes per tensor count, each method's median over them (default 3)")
    args = parser.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype)
    available = {name: shapes[1 if args.quick else 0] for name, shapes in SETS.items()}
    available = {name: make for name, make in available.items() if make is not None}
    chosen = args.sets or list(available)
    unknown = [name for name in chosen if name not in available]
    if unknown:
        parser.error(f"unknown set(s) {unknown} for this mode; choose from {list(available)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    rounds = args.rounds or (5 if args.quick else 15)
    if args.host:
        return host_main(args, device)
    target_s = (0.02 if args.quick else 0.1) if device.type == "cpu" else 0.01
    torch.manual_seed(0)

    modes = MODES.get(dtype, {})
    per_param = {name: bytes_per_param(dtype, modes.get(name)) for name in methods(device, dtype)}
    clock = Clock(device)
    ceiling = bandwidths(device, clock, 2**30)
    copy_gbps = ceiling["copy"]
    meta = dict(device=device_name(device), torch=torch.__version__, cuda=torch.version.cuda or "none",
                python=platform.python_version(), dtype=args.dtype, bytes_per_param=per_param,
                date=datetime.date.today().isoformat(), quick=args.quick, rounds=rounds, hyper=HYPER,
                command=" ".join(["python"] + [shlex.quote(a) for a in sys.argv]))
    print(f"{meta['device']}: copy {copy_gbps:.1f} GB/s, in place {ceiling['in_place']:.1f} GB/s", flush=True)

    result = dict(meta=meta, copy_gbps=copy_gbps, in_place_gbps=ceiling["in_place"], sets=[])
    host_set = "2000x64x64" if "2000x64x64" in chosen else chosen[0]
    make = methods(device, dtype)
    if args.methods:
        unknown = [m for m in args.methods if m not in make]
        if unknown:
            parser.error(f"unknown method(s) {unknown}; choose from {list(make)}")
        make = {m: f for m, f in make.items() if m == "FusedNAG" or m in args.methods}
    for name in chosen:
        shapes = available[name]()
        numel = sum(math.prod(s) for s in shapes)
        copies = max(1, math.ceil(2 * cache_bytes(device) / (numel * per_param["FusedNAG"] * 3 / 5)))
        data = build_copies(shapes, device, dtype, copies)
        runs = {m: make_optimizers(factory, data, own_state=m in modes) for m, factory in make.items()}
        samples = time_interleaved(runs, device, rounds, target_s, warmup=3)
        ours = statistics.median(samples["FusedNAG"])
        entry = dict(name=name, tensors=len(shapes), params=numel, copies=copies, methods={})
        for m, s in samples.items():
            sec = statistics.median(s)
            gbps = numel * per_param[m] / sec / 1e9
            entry["methods"][m] = dict(ms=sec * 1e3, gbps=gbps, pct_copy=100 * gbps / copy_gbps,
                                       bytes_per_param=per_param[m], roofline_ms=numel * per_param[m] / copy_gbps / 1e6,
                                       vs_fusednag=sec / ours, samples=len(s),
                                       ms_p10=1e3 * statistics.quantiles(s, n=10)[0] if len(s) > 1 else sec * 1e3,
                                       ms_p90=1e3 * statistics.quantiles(s, n=10)[-1] if len(s) > 1 else sec * 1e3)
        result["sets"].append(entry)
        print(f"{name}: " + ", ".join(f"{m} {r['ms']:.3f} ms ({r['vs_fusednag']:.2f}x)"
                                      for m, r in entry["methods"].items()), flush=True)
        if name == host_set:
            result["host_overhead_set"] = name
            result["host_overhead_us"] = {m: 1e6 * s for m, s in
                                          host_overhead(runs, data, device, reps=20 if args.quick else 100).items()}
            result["step_allocations"] = {m: step_allocations(opts[0], device) for m, opts in runs.items()}
        del runs, data

    result["targets"] = target_lines(result, device.type == "cuda")
    result["host_per_tensor"] = host_per_tensor_fresh(device, counts=HOST_COUNTS[:2] if args.quick else HOST_COUNTS)
    table = markdown(result) + "\n\n" + host_markdown(result["host_per_tensor"])
    print("\n" + table)
    stem = save(args.out, f"{device.type} {meta['device']} {args.dtype}{' quick' if args.quick else ''}", result, table)
    written = [f"{stem}.json", f"{stem}.md"]
    if not args.no_plot:
        plot(result, args.out / f"{stem}.png")
        written.append(f"{stem}.png")
    print(f"\nwrote {', '.join(written)} in {args.out}")
    return result


def save(out, name, result, table):
    """Writes result (JSON) and table (markdown) to out/<name as a file stem>.{json,md}; returns the stem."""
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table + "\n")
    return stem


def host_main(args, device):
    """--host: the host cost per tensor alone, with the issue's targets, written next to the other results."""
    host = host_per_tensor_fresh(device, processes=args.processes)
    groups = {name: {int(n): us for n, us in row.items()}
              for name, row in in_fresh_process(f"host_per_group(torch.device({str(device)!r}))").items()}
    meta = dict(device=device_name(device), torch=torch.__version__, python=platform.python_version(),
                date=datetime.date.today().isoformat(), command=" ".join(["python"] + [shlex.quote(a) for a in sys.argv]))
    result = dict(meta=meta, host_per_tensor=host, targets=host_targets(host), host_per_group=groups)
    table = "\n".join([f"Device: {meta['device']}; torch {meta['torch']}, Python {meta['python']}, {meta['date']}",
                       f"Command: `{meta['command']}`", "", host_markdown(host), "",
                       f"(each count in {args.processes} fresh processes, medians over them)", "", "Targets (issue 13):",
                       *result["targets"], "", group_markdown(groups)])
    print(table)
    stem = save(args.out, f"{device.type} {meta['device']} host", result, table)
    print(f"\nwrote {stem}.json, {stem}.md in {args.out}")
    return result


if __name__ == "__main__":
    main()
