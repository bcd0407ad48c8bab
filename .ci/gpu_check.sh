#!/usr/bin/env bash
# On a machine with a CUDA GPU (the device tool's H100/H200):
#   test:     CUDA build, the test suite on CUDA and CPU, each step test on both step paths (the C++ stages and the
#             Python ones; the >2^31-element, CUDA-graph, AMP, clipping, no-sync, hostile-input, fuzz and precision-mode
#             tests included), and small steps of every mode, clipping and GradScaler, on both paths, under
#             compute-sanitizer memcheck;
#   bench:    the step benchmark in float32 and bfloat16 (each with FusedNAG's low-precision modes);
#   evidence: benchmarks/precision_modes.py on CUDA.
#   bash .ci/gpu_check.sh [all|test|bench|evidence]    (default all; each stage fits one 10-minute device call)
# Environment: PYTEST_K (a pytest -k expression), BENCH_ARGS (e.g. "--rounds 7 --sets gpt2-124m 1x256M"),
# NAG_SKIP_INSTALL=1 (test the nag_cuda already installed).
# Everything printed goes to $OUT/gpu_check.log, results to $OUT/results without charts (at most 7 files, within the
# device tool's 8; the charts are redrawn from the JSON). Commit the results under benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
failed=0
out=${OUT:-gpu_check_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$out/gpu_check.log") 2>&1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
# build/ is kept between calls on a warm machine, so a second stage rebuilds only what changed.
if [ "${NAG_SKIP_INSTALL:-0}" != 1 ]; then
  # The lent machines set CC/CXX to a toolchain (/opt/gcc) whose C++ runtime is not the one torch runs with: any
  # extension built with it segfaults as soon as an error message formats a number. The system compiler is fine.
  env -u CC -u CXX NAG_CUDA_BUILD=1 python -m pip install --no-build-isolation --no-deps . 2>&1 | tail -n 3
fi
(cd /tmp && python -m nag_cuda)

if [ "$stage" = all ] || [ "$stage" = test ]; then
  # pytest-xdist, where installed: a crashing test takes down one worker, not the whole run.
  xdist=$(python -c "import xdist" 2>/dev/null && echo "-n 8" || true)
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=2 python -m pytest -q -rs $xdist ${PYTEST_K:+-k "$PYTEST_K"} tests || failed=1  # the rest runs
  step=$(mktemp --suffix=.py)
  cat > "$step" <<'PY'
import torch
from nag_cuda import FusedNAG
import nag_cuda._step
torch.manual_seed(0)
cases = [(dtype, {}) for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)]
cases += [(torch.bfloat16, dict(master_weights=True)), (torch.bfloat16, dict(stochastic_rounding=True)),
          (torch.float16, dict(momentum_dtype=torch.float32)), (torch.float32, dict(momentum_dtype=torch.bfloat16))]
cases += [(dtype, dict(max_grad_norm=0.5, norm_type=p)) for dtype in (torch.float32, torch.bfloat16)
          for p in (2.0, 1.0, float("inf"))]
# Each case on both step paths (the C++ stages and the Python ones), in two param groups of other lrs (two op
# calls), with and without GradScaler's tensors.
for cpp in (True, False):
    nag_cuda._step.CPP_STEP = cpp
    for dtype, options in cases:
        for scaled in (False, True):
            big = torch.randn(70001, device="cuda", dtype=dtype)
            params = [torch.randn(s, device="cuda", dtype=dtype, requires_grad=True)
                      for s in [(0,), (1,), (33, 17), (4099,)]]
            params.append(big[1:].detach().requires_grad_())  # unaligned: the scalar path
            opt = FusedNAG([{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], lr=0.1, weight_decay=1e-2,
                           **options)
            if scaled:
                opt.grad_scale = torch.full((), 4.0, device="cuda")
                opt.found_inf = torch.zeros((), device="cuda")
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
    # shellcheck disable=SC2086
    python benchmarks/bench_step.py --dtype "$dtype" --no-plot --out "$out/results" ${BENCH_ARGS:-}
  done
fi

if [ "$stage" = all ] || [ "$stage" = evidence ]; then
  python benchmarks/precision_modes.py --device cuda --no-plot --out "$out/results"
fi
exit $failed
