// The Nesterov-momentum update of one element: the only place the math lives.
//
// Both kernels call nag_update(): the CPU kernel (nag_cpu.cpp) and the CUDA kernel (nag_kernel.cu), so the
// CPU tests run the exact arithmetic the GPU runs. This header includes nothing from torch or CUDA.
//
// It is torch.optim.SGD(nesterov=True, dampening=0) written for one element, rounded where torch's own per-tensor
// code rounds, so that fp32 and fp64 results are bit-identical to torch's for-loop SGD on CPU and on CUDA:
//   g = maximize ? -grad : grad
//   g = fma(weight_decay, p, g)           grad.add(param, alpha=wd), only when weight_decay != 0, as torch does
//   buf = first ? g : momentum * buf + g  buf.mul_(momentum).add_(grad): two roundings
//   g = fma(momentum, buf, g)             grad.add(buf, alpha=momentum)
//   p = fma(-lr, g, p)                    param.add_(grad, alpha=-lr)
// (ATen's add with alpha is a fused multiply-add: Vectorized fmadd on CPU, contracted by nvcc on CUDA.)
// T is the math type ("opmath"): float for float/half/bfloat16 tensors, double for double. Callers load
// tensor values into T and round once when they store p and buf.
//
// NOTE: every fused multiply-add is spelled out with fma(), and the compilers may contract nothing else
// (setup.py: -fmad=false, -ffp-contract=off), so CPU and GPU give bit-identical results.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define NAG_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NAG_HOST_DEVICE inline
#endif

namespace nag {

NAG_HOST_DEVICE float fused_mul_add(float a, float b, float c) { return fmaf(a, b, c); }
NAG_HOST_DEVICE double fused_mul_add(double a, double b, double c) { return fma(a, b, c); }

// GradScaler: grads are multiplied by 1/scale, as torch.amp.GradScaler.unscale_ does (the op computes 1/scale).
template <typename T>
NAG_HOST_DEVICE T unscale(T grad, float inv_scale) { return grad * static_cast<T>(inv_scale); }

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
  // A select, not a branch, so that the CPU loop stays vectorisable.
  g = h.weight_decay != T(0) ? fused_mul_add(h.weight_decay, p, g) : g;
  buf = kFirst ? g : h.momentum * buf + g;
  g = fused_mul_add(h.momentum, buf, g);
  p = fused_mul_add(-h.lr, g, p);
}

}  // namespace nag
