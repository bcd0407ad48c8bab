#!/usr/bin/env bash
# Compiles the CUDA side without a GPU and without torch's CUDA headers (CI has torch's CPU wheel):
#   - every csrc/*.cu with nvcc, for sm_80 and sm_90, with torch's own nvcc flags and ptxas checks of the kernel
#     (e.g. that the 32 KiB kernel-argument table fits);
#   - the C++ sources with NAG_WITH_CUDA defined (-fsyntax-only), the kernels' libraries' ones as setup.py builds
#     them: on torch's stable ABI for torch 2.11 (TORCH_TARGET_VERSION), Python's limited API, USE_CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || { echo "check_cuda_sources: nvcc not found on PATH" >&2; exit 1; }
nvcc_flags=$(python -c "from torch.utils.cpp_extension import COMMON_NVCC_FLAGS; print(' '.join(COMMON_NVCC_FLAGS))")
torch_includes=$(python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for cu in csrc/*.cu; do
  echo "nvcc: $cu"
  nvcc -std=c++20 -O3 -fmad=false -DNAG_WITH_CUDA $nvcc_flags -Icsrc \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -Xptxas=-warn-spills,-warn-lmem-usage -Werror all-warnings -c "$cu" -o "$out/$(basename "$cu").o"
done
stable=$(python -c "import setup; print(' '.join(setup.CPU_KERNELS + setup.CUDA_KERNELS))")
for cpp in csrc/*.cpp; do
  flags=(-DNAG_WITH_CUDA)
  if [[ " $stable " == *" $(basename "$cpp") "* ]]; then
    flags=($(python -c "import setup; from torch.utils.cpp_extension import min_supported_cpython as v
print(' '.join(setup.STABLE_ABI), f'-DPy_LIMITED_API={v}')") -DUSE_CUDA)
  fi
  echo "c++ ${flags[*]} -fsyntax-only: $cpp"
  c++ -std=c++20 -fsyntax-only "${flags[@]}" -Icsrc $torch_includes $(python3-config --includes) "$cpp"
done
echo "CUDA sources compile"
