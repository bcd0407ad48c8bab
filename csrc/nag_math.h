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
// tensor values into T and round once when they store p and buf. The low-precision modes change only what is
// loaded and stored: a buffer of another dtype (momentum_dtype), p read from and written to a float32 master copy and
// rounded into the param (master_weights), or p rounded stochastically (bfloat16_bits_stochastic, below).
//
// NOTE: every fused multiply-add is spelled out with fma(), and the compilers may contract nothing else
// (setup.py: -fmad=false, -ffp-contract=off), so CPU and GPU give bit-identical results.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

// Always inlined: the CPU loops are vectorised only where the math is inlined into each target clone (gcc otherwise
// keeps some instantiations as calls, and fmaf as a libm call: 20x slower, seen for bfloat16).
#if defined(__CUDACC__)
#define NAG_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define NAG_HOST_DEVICE inline __attribute__((always_inline))
#else
#define NAG_HOST_DEVICE inline
#endif

namespace nag {

NAG_HOST_DEVICE float fused_mul_add(float a, float b, float c) { return fmaf(a, b, c); }
NAG_HOST_DEVICE double fused_mul_add(double a, double b, double c) { return fma(a, b, c); }

// GradScaler: grads are multiplied by 1/scale, as torch.amp.GradScaler.unscale_ does (the op computes 1/scale).
template <typename T>
NAG_HOST_DEVICE T unscale(T grad, float inv_scale) { return grad * static_cast<T>(inv_scale); }

// Gradient clipping (FusedNAG(max_grad_norm=...)): grads multiplied by clip_grad_norm_'s coefficient
// min(1, max_norm / (norm + 1e-6)) as they are read, as its grad.mul_(coef) would (the caller rounds the product to
// the grad's dtype, as that in-place multiply does); the grads themselves are not written.
template <typename T>
NAG_HOST_DEVICE T clip(T grad, float coef) { return grad * static_cast<T>(coef); }

// The norm of max_grad_norm, as a reduction: what each element adds to a partial result, and how
// two partial results combine. Sums of |g|^p, or the largest |g| for p = inf; NaN propagates through both.
enum class NormKind : int32_t { kTwo, kOne, kInf, kOther };

template <NormKind K, typename A>
NAG_HOST_DEVICE A norm_term(A x, A p) {
  const A a = x < A(0) ? -x : x;
  if (K == NormKind::kTwo) return x * x;
  if (K == NormKind::kOne || K == NormKind::kInf) return a;
  return pow(a, p);
}

template <NormKind K, typename A>
NAG_HOST_DEVICE A norm_combine(A acc, A term) {
  if (K == NormKind::kInf) return (term > acc || term != term) ? term : acc;
  return acc + term;
}

// Hyperparameters of one step, already converted to the math type.
template <typename T>
struct Hyper {
  T lr;
  T momentum;
  T weight_decay;
  bool maximize;
  // weight_decay != 0 as torch's SGD decides it, on the double: a decay too small for T is 0 there, and torch still
  // adds 0 * p (which makes an inf param's step NaN and a -0.0 gradient +0.0)
  bool decay;
};

// torch's add(..., alpha=a) rounds a * b + c once where its kernels fuse it: always on CUDA, and on CPU wherever
// torch's CPU capability has FMA. Its x86-64 kernels at the DEFAULT capability (CPUs without AVX2, or
// ATEN_CPU_CAPABILITY=default) round the product first; kFused=false does the same, so the bits still match.
template <bool kFused, typename T>
NAG_HOST_DEVICE T mul_add(T a, T b, T c) {
  if (kFused) return fused_mul_add(a, b, c);
  return a * b + c;  // two roundings: the compilers contract nothing (see the NOTE above)
}

// kDecay: weight_decay != 0, decided by the caller for a whole loop (a select inside it keeps gcc from vectorising).
template <bool kFirst, bool kDecay, bool kFused = true, typename T>
NAG_HOST_DEVICE void nag_update(T& p, T grad, T& buf, const Hyper<T>& h) {
  T g = h.maximize ? -grad : grad;
  if (kDecay) g = mul_add<kFused>(h.weight_decay, p, g);
  buf = kFirst ? g : h.momentum * buf + g;
  g = mul_add<kFused>(h.momentum, buf, g);
  p = mul_add<kFused>(-h.lr, g, p);
}

// Stochastic rounding of the float32 result to bfloat16 (FusedNAG(stochastic_rounding=True)): round up with
// probability (x - down) / (up - down), so that the rounded update is unbiased and small updates accumulate in
// expectation instead of vanishing. Adding 16 random bits below bfloat16's last bit and truncating does exactly
// that, in magnitude, so it is symmetric in sign. Infinities stay infinite (the carry stops in the mantissa) and NaN
// becomes the quiet NaN that round-to-nearest gives (c10's 0x7fc0). Selects only: gcc vectorises the CPU loop.
NAG_HOST_DEVICE uint16_t bfloat16_bits_stochastic(float x, uint32_t random) {
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(x);
#else
  memcpy(&u, &x, sizeof(u));
#endif
  const uint16_t rounded = static_cast<uint16_t>((u + (random & 0xffffu)) >> 16);
  return x != x ? static_cast<uint16_t>(0x7fc0u) : rounded;
}

// The random bits: a counter-based hash, so that the CPU and CUDA kernels draw the same bits for the same element
// with no generator state. splitmix64's finaliser (a bijection of 64 bits); keys differ per step and launch
// (host), segment and element (kernels).
constexpr uint64_t kGoldenGamma = 0x9e3779b97f4a7c15ull;

NAG_HOST_DEVICE uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

NAG_HOST_DEVICE uint64_t derive_key(uint64_t key, int64_t index) {
  return mix64(key + static_cast<uint64_t>(index + 1) * kGoldenGamma);
}

}  // namespace nag
