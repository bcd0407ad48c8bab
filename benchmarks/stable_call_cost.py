"""What a call of a LibTorch stable-ABI op costs the host per tensor, beside FusedNAG's step and torch's fused SGD
(issue 28: the split of the kernels into a library built on the stable ABI).

A stable kernel is boxed: each tensor of a `Tensor[]` argument reaches it as a new heap handle, and each property it
reads (dtype, sizes, data pointer) is a call into libtorch. This script compiles a stable op with nag_step_'s lists
(`Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, bool[] is_first, float lr`) in two forms, and times, with
one-element float32 tensors:

  stable, lists only   a kernel that reads nothing: what passing the lists costs
  stable op            a kernel that reads what a real one must (dtype, numel, data pointer) and writes nothing, called
                       below ADInplaceOrView, then torch._C._increment_version of the two written lists: what FusedNAG
                       would do without a version-specific module, less its Python stages and the math
  nag_step_ op         the current op (unboxed kernel, at::TensorList), called from Python
  FusedNAG.step()      the whole step on its C++ path
  torch fused          torch.optim.SGD(nesterov=True, fused=True).step()

Each a best-of-rounds µs per tensor, interleaved in one process. Needs a C++ compiler (the op is built at run time by
torch.utils.cpp_extension). Usage: python benchmarks/stable_call_cost.py [--counts 2000 10000]
"""

import argparse
import os
import tempfile
import time

import torch
from torch.utils.cpp_extension import load

from nag_cuda import FusedNAG

SOURCE = r"""
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <vector>

using torch::stable::Tensor;

// What a kernel reads of each tensor before it can run; the sum keeps the reads from being optimised away.
void read_(std::vector<Tensor> params, std::vector<Tensor> grads, std::vector<Tensor> bufs, std::vector<bool> first,
           double lr) {
  STD_TORCH_CHECK(grads.size() == params.size() && bufs.size() == params.size() && first.size() == params.size(),
                  "lengths");
  int64_t numel = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    for (const Tensor* t : {&params[i], &grads[i], &bufs[i]}) {
      STD_TORCH_CHECK(t->scalar_type() == torch::headeronly::ScalarType::Float, "float32 only");
      numel += t->numel() + (t->mutable_data_ptr() != nullptr);
    }
  }
  STD_TORCH_CHECK(numel > 0 || params.empty(), "unreachable");
}

void pass_(std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<bool>, double) {}

STABLE_TORCH_LIBRARY(nag_stable_probe, m) {
  m.def("pass_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, bool[] is_first, float lr) -> ()");
  m.def("read_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, bool[] is_first, float lr) -> ()");
}
STABLE_TORCH_LIBRARY_IMPL(nag_stable_probe, CPU, m) {
  m.impl("pass_", TORCH_BOX(&pass_));
  m.impl("read_", TORCH_BOX(&read_));
}
"""


def build():
    folder = tempfile.mkdtemp(prefix="nag_stable_probe_")
    path = os.path.join(folder, "probe.cpp")
    with open(path, "w") as f:
        f.write(SOURCE)
    # torch 2.11 as the target: what the stable library would be built for
    load("nag_stable_probe", [path], extra_cflags=["-O2", "-DTORCH_TARGET_VERSION=0x020b000000000000"],
         build_directory=folder, is_python_module=False, verbose=False)
    return torch.ops.nag_stable_probe


def methods(n, probe):
    params = [torch.nn.Parameter(torch.rand(1)) for _ in range(n)]
    for p in params:
        p.grad = torch.rand_like(p)
    ours = FusedNAG(params, lr=0.1, momentum=0.9)
    ours.step()
    bufs = [ours.state[p]["momentum_buffer"] for p in params]
    grads = [p.grad for p in params]
    first = [False] * n
    tparams = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, g in zip(tparams, grads):
        p.grad = g.clone()
    fused = torch.optim.SGD(tparams, lr=0.1, momentum=0.9, nesterov=True, fused=True)
    fused.step()
    data = [p.detach() for p in params]
    op = torch.ops.nag_cuda.nag_step_.default

    def lists_only():
        with torch._C._AutoDispatchBelowADInplaceOrView():
            probe.pass_(data, grads, bufs, first, 0.1)

    def stable():
        with torch._C._AutoDispatchBelowADInplaceOrView():
            probe.read_(data, grads, bufs, first, 0.1)
        torch._C._increment_version(data)
        torch._C._increment_version(bufs)

    def current():
        with torch.no_grad():
            op(data, grads, bufs, first, 0.1, 0.9, 0.0, False)

    return {"stable, lists only": lists_only, "stable op": stable, "nag_step_ op": current, "FusedNAG.step()": ours.step, "torch fused": fused.step}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure(args)
    finally:
        torch.set_num_threads(threads)  # (the test suite calls main())


def measure(args):
    probe = build()
    print(f"torch {torch.__version__}, one thread, µs per tensor (best of {args.rounds} rounds of {args.steps} calls)")
    results = {}
    for n in args.counts:
        fns = methods(n, probe)
        best = dict.fromkeys(fns, float("inf"))
        for fn in fns.values():
            fn()
        for _ in range(args.rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                best[name] = min(best[name], (time.perf_counter() - start) / args.steps / n * 1e6)
        cells = ", ".join(f"{name} {us:.3f}" for name, us in best.items())
        print(f"{n} tensors: {cells}; stable op ÷ nag_step_ op {best['stable op'] / best['nag_step_ op']:.2f}")
        results[n] = best
    return results


if __name__ == "__main__":
    main()
