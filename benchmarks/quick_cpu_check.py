"""Quick, sequential CPU timing of step() for two parameter sets (a first look; the benchmark issue replaces it)."""
import time

import torch

from nag_cuda import FusedNAG
def bench(make, shapes, reps=20):
    ps = [torch.randn(s, requires_grad=True) for s in shapes]
    for p in ps: p.grad = torch.randn_like(p)
    opt = make(ps); opt.step(); opt.step()
    t = time.perf_counter()
    for _ in range(reps): opt.step()
    return (time.perf_counter() - t) / reps * 1e3
sets = {"large 4x4M": [(4_000_000,)] * 4, "2000x64x64": [(64, 64)] * 2000}
kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
for name, shapes in sets.items():
    r = {"FusedNAG": bench(lambda p: FusedNAG(p, **kw), shapes)}
    for mode in ("foreach", "fused"):
        r[mode] = bench(lambda p: torch.optim.SGD(p, nesterov=True, **{mode: True}, **kw), shapes)
    r["for-loop"] = bench(lambda p: torch.optim.SGD(p, nesterov=True, foreach=False, **kw), shapes)
    print(name, {k: f"{v:.2f} ms" for k, v in r.items()}, "fused/ours %.2f foreach/ours %.2f" % (r["fused"]/r["FusedNAG"], r["foreach"]/r["FusedNAG"]))
