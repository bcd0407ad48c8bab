#!/usr/bin/env bash
# On a machine with a CUDA GPU (the device tool's H100/H200): CUDA build, the whole test suite on CUDA and CPU, the
# >2^31-element test, one small step under compute-sanitizer memcheck, then the step benchmark (fp32 and bf16).
# Logs and benchmark results go to $OUT (or ./gpu_check_out); commit the results under benchmarks/results/.
#   bash .ci/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
NAG_CUDA_BUILD=1 python -m pip install --no-build-isolation --no-deps . 2>&1 | tail -n 3 | tee "$out/build.log"
python -m nag_cuda | tee "$out/info.txt"
python -m pytest -q -rs tests 2>&1 | tee "$out/pytest.log"

cat > "$out/sanitize_step.py" <<'PY'
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
compute-sanitizer --tool memcheck --error-exitcode 1 python "$out/sanitize_step.py" 2>&1 | tail -n 5 | tee "$out/memcheck.log"

for dtype in float32 bfloat16; do
  python benchmarks/bench_step.py --dtype "$dtype" --out "$out/results" 2>&1 | tee "$out/bench_$dtype.log"
done
