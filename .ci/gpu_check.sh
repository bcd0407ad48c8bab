#!/usr/bin/env bash
# On a machine with a CUDA GPU (the device tool's H100/H200):
#   test:  CUDA build, the whole test suite on CUDA and CPU (the >2^31-element, CUDA-graph, AMP and no-sync tests
#          included), and one small step under compute-sanitizer memcheck;
#   bench: the step benchmark in float32 and bfloat16.
#   bash .ci/gpu_check.sh [all|test|bench]      (default all; each stage fits one 10-minute device call)
# Everything printed goes to $OUT/gpu_check.log and the benchmark results to $OUT/results (7 files in all, within
# the device tool's 8); commit the results under benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
out=${OUT:-gpu_check_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$out/gpu_check.log") 2>&1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
# build/ is kept between calls on a warm machine, so a second stage rebuilds only what changed.
NAG_CUDA_BUILD=1 python -m pip install --no-build-isolation --no-deps . 2>&1 | tail -n 3
python -m nag_cuda

if [ "$stage" = all ] || [ "$stage" = test ]; then
  python -m pytest -q -rs tests
  step=$(mktemp --suffix=.py)
  cat > "$step" <<'PY'
import torch
from nag_cuda import FusedNAG
torch.manual_seed(0)
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    big = torch.randn(70001, device="cuda", dtype=dtype)
    params = [torch.randn(s, device="cuda", dtype=dtype, requires_grad=True) for s in [(0,), (1,), (33, 17), (4099,)]]
    params.append(big[1:].detach().requires_grad_())  # unaligned: the scalar path
    opt = FusedNAG(params, lr=0.1, weight_decay=1e-2)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
torch.cuda.synchronize()
print("sanitize_step: done")
PY
  compute-sanitizer --tool memcheck --error-exitcode 1 python "$step" 2>&1 | tail -n 5
fi

if [ "$stage" = all ] || [ "$stage" = bench ]; then
  for dtype in float32 bfloat16; do
    python benchmarks/bench_step.py --dtype "$dtype" --out "$out/results"
  done
fi
