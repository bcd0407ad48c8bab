// The Nesterov-momentum update of one element: the only place the math lives.
//
// Both kernels call nag_update(): the CPU kernel (nag_cpu.cpp) and the CUDA kernel (nag_kernel.cu), so the
// CPU tests run the exact arithmetic the GPU runs. This header includes nothing from torch or CUDA.
//
// It is torch.optim.SGD(nesterov=True, dampening=0) written for one element:
//   g = maximize ? -grad : grad
//   g = g + weight_decay * p              (only when weight_decay != 0, as torch does)
//   buf = first ? g : momentum * buf + g  (first: this parameter's first step)
//   g = g + momentum * buf
//   p = p - lr * g
// T is the math type ("opmath"): float for float/half/bfloat16 tensors, double for double. Callers load
// tensor values into T and round once when they store p and buf.
//
// NOTE: nvcc would contract `a * b + c` into one fused multiply-add while the host compiler, at its baseline
// x86-64 target, rounds twice. setup.py builds both sides with contraction off (-fmad=false, -ffp-contract=off)
// so that CPU and GPU give bit-identical results; the step is memory-bound, so the extra instruction is free.
#pragma once

#if defined(__CUDACC__)
#define NAG_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NAG_HOST_DEVICE inline
#endif

namespace nag {

// Hyperparameters of one step, already converted to the math type.
template <typename T>
struct Hyper {
  T lr;
  T momentum;
  T weight_decay;
  bool maximize;
};

template <bool kFirst, typename T>
NAG_HOST_DEVICE void nag_update(T& p, T grad, T& buf, const Hyper<T>& h) {
  T g = h.maximize ? -grad : grad;
  // A select, not a branch, so that the CPU loop stays vectorisable; torch skips the term when weight_decay == 0
  // (which matters for inf/nan parameters), and so does this.
  g = h.weight_decay != T(0) ? g + h.weight_decay * p : g;
  buf = kFirst ? g : h.momentum * buf + g;
  g = g + h.momentum * buf;
  p = p - h.lr * g;
}

}  // namespace nag
