// The CPU kernel: runs the same schedule as the CUDA kernel, one parallel task per range of blocks, and the same
// per-element math (nag_math.h). The inner loop is plain enough for the compiler to vectorise.
#include <algorithm>
#include <type_traits>

#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "nag_group.h"
#include "nag_math.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace nag {
namespace {

// How the loop loads and stores each dtype, and the math type it computes in. float16 and bfloat16 are handled as raw
// uint16_t bits with c10's own conversions (round to nearest even), because gcc does not vectorise a loop over the
// c10::Half / c10::BFloat16 classes. It vectorises the bfloat16 conversions but not the float16 ones, so float16
// goes through F16C tiles where the CPU has them (update_half below).
template <typename T> struct Io {
  using Storage = T;
  using Math = T;
  static T load(T v) { return v; }
  static T store(T v) { return v; }
};
template <> struct Io<c10::Half> {
  using Storage = uint16_t;
  using Math = float;
  static float load(uint16_t v) { return c10::detail::fp16_ieee_to_fp32_value(v); }
  static uint16_t store(float v) { return c10::detail::fp16_ieee_from_fp32_value(v); }
};
template <> struct Io<c10::BFloat16> {
  using Storage = uint16_t;
  using Math = float;
  static float load(uint16_t v) { return c10::detail::f32_from_bits(v); }
  static uint16_t store(float v) { return c10::detail::round_to_nearest_even(v); }
};

// One x86-64 build uses the widest vectors the CPU has: gcc emits a clone of the loop per target and picks one at
// load time. Every clone gives the same bits, since contraction into FMA is off (setup.py).
#if defined(__x86_64__) && !defined(__clang__) && __GNUC__ >= 12
#define NAG_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NAG_VECTOR_CLONES
#endif

template <bool kFirst, typename T, typename S = typename Io<T>::Storage, typename M = typename Io<T>::Math>
NAG_VECTOR_CLONES void update_chunk(S* __restrict__ p, const S* __restrict__ g, S* __restrict__ b, int64_t n,
                                    const Hyper<M>& h) {
  for (int64_t i = 0; i < n; ++i) {
    M pm = Io<T>::load(p[i]);
    M bm = kFirst ? M(0) : Io<T>::load(b[i]);
    nag_update<kFirst>(pm, Io<T>::load(g[i]), bm, h);
    p[i] = Io<T>::store(pm);
    b[i] = Io<T>::store(bm);
  }
}

// GradScaler: grads unscaled in place, one block at a time (the block is then still in cache for the update).
template <typename T, typename S = typename Io<T>::Storage, typename M = typename Io<T>::Math>
NAG_VECTOR_CLONES void unscale_chunk(S* __restrict__ g, int64_t n, float inv_scale) {
  for (int64_t i = 0; i < n; ++i) g[i] = Io<T>::store(unscale(Io<T>::load(g[i]), inv_scale));
}

#if defined(__x86_64__) && defined(__GNUC__)
// float16 <-> float32 with the F16C instructions, 8 at a time, both exact or round-to-nearest-even like c10's.
__attribute__((target("avx2,f16c"))) void half_to_float(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

__attribute__((target("avx2,f16c"))) void float_to_half(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return yes;
}

// float16 in L1-sized tiles: convert to float, run the (vectorised) float loop, convert back. Same bits as the
// scalar conversions, several times faster.
template <bool kFirst>
void update_half(uint16_t* p, const uint16_t* g, uint16_t* b, int64_t n, const Hyper<float>& h) {
  constexpr int64_t kTile = 1024;
  float pf[kTile], gf[kTile], bf[kTile];
  for (int64_t i = 0; i < n; i += kTile) {
    const int64_t m = std::min(kTile, n - i);
    half_to_float(p + i, pf, m);
    half_to_float(g + i, gf, m);
    if (!kFirst) half_to_float(b + i, bf, m);
    update_chunk<kFirst, float>(pf, gf, bf, m, h);
    float_to_half(pf, p + i, m);
    float_to_half(bf, b + i, m);
  }
}
#endif

template <bool kFirst, typename T, typename S, typename M>
void update_block(S* p, const S* g, S* b, int64_t n, const Hyper<M>& h) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (has_f16c()) return update_half<kFirst>(p, g, b, n, h);
  }
#endif
  update_chunk<kFirst, T>(p, g, b, n, h);
}

template <typename T>
void run(const Group& group, const StepArgs& a) {
  using S = typename Io<T>::Storage;
  using M = typename Io<T>::Math;
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // GradScaler found inf/nan: skip the step
  const float inv_scale = a.inv_grad_scale != nullptr ? *a.inv_grad_scale : 1.0f;
  const double lr = a.lr_tensor == nullptr ? a.lr
                    : a.lr_tensor_is_double ? *static_cast<const double*>(a.lr_tensor)
                                            : *static_cast<const float*>(a.lr_tensor);
  const Hyper<M> h{M(lr), M(a.momentum), M(a.weight_decay), a.maximize};
  LaunchTable table;
  for_each_table(group, table, [&](const LaunchTable& t) {
    const int64_t blocks = t.block_start[t.size];
    int64_t elements = 0;
    for (int s = 0; s < t.size; ++s) elements += t.numel[s];
    // Small launches run on the calling thread: waking the pool costs more than the work.
    const int64_t grain = elements <= at::internal::GRAIN_SIZE ? blocks : 1;
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        const BlockWork w = block_work(t.block_start, t.numel, t.size, block);
        S* p = static_cast<S*>(t.param[w.segment]) + w.begin;
        S* g = static_cast<S*>(t.grad[w.segment]) + w.begin;
        S* b = static_cast<S*>(t.buf[w.segment]) + w.begin;
        if (a.inv_grad_scale != nullptr) unscale_chunk<T>(g, w.end - w.begin, inv_scale);
        if (t.first[w.segment]) {
          update_block<true, T>(p, g, b, w.end - w.begin, h);
        } else {
          update_block<false, T>(p, g, b, w.end - w.begin, h);
        }
      }
    });
  });
}

}  // namespace

void run_cpu(const Group& group, const StepArgs& args) {
  switch (group.dtype) {
    case Dtype::kFloat: return run<float>(group, args);
    case Dtype::kDouble: return run<double>(group, args);
    case Dtype::kHalf: return run<c10::Half>(group, args);
    case Dtype::kBFloat16: return run<c10::BFloat16>(group, args);
  }
}

}  // namespace nag
