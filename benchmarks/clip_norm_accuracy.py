"""max_grad_norm: how far FusedNAG's grad norm and torch's clip_grad_norm_ norm (float32 foreach, as users run it)
are from the exact norm (float64), in units in the last place of a float32, over dtypes, norm types and sizes.

    python benchmarks/clip_norm_accuracy.py
"""
import torch, math
from nag_cuda import FusedNAG
from torch.nn.utils import get_total_norm
torch.manual_seed(0)
worst = {}
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
  for sizes in ([1000]*10, [2**20+3]*3, [7, 33, 4099, 2**24+1], [64*64]*2000):
    for p in (2.0, 1.0, float("inf")):
      ps = [torch.nn.Parameter(torch.zeros(n, dtype=dtype)) for n in sizes]
      for q in ps: q.grad = torch.randn(q.shape, dtype=torch.float64).to(dtype)
      opt = FusedNAG(ps, lr=0.0, momentum=0.9, max_grad_norm=1.0, norm_type=p)
      opt.step()
      exact = get_total_norm([q.grad.double() for q in ps], p).item()
      ours = opt.last_grad_norm.item()
      theirs = get_total_norm([q.grad for q in ps], p).double().item()
      ulp = 2.0 ** (math.floor(math.log2(exact)) - 23)
      key = (str(dtype), p)
      e = (abs(ours - exact) / ulp, abs(theirs - exact) / ulp)
      worst[key] = tuple(max(a, b) for a, b in zip(worst.get(key, (0, 0)), e))
for k, (o, t) in worst.items(): print(k, f"ours {o:.2f} ulp(fp32) of the exact norm, torch {t:.2f}")
