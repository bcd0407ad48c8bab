// The CPU kernel: runs the same schedule as the CUDA kernel, one parallel task per range of blocks, and the same
// per-element math (nag_math.h). The inner loop is plain enough for the compiler to vectorise.
// Built into nag_cuda._kernels on torch's stable ABI (nag_kernels.h): torch's header-only types and
// torch::stable::parallel_for only, no ATen.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <type_traits>

#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include "nag_group.h"
#include "nag_math.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace nag {
namespace {

// How the loop loads and stores each dtype, and the math type it computes in. float16 and bfloat16 are handled as raw
// uint16_t bits with c10's own conversions (round to nearest even), because gcc does not vectorise a loop over the
// c10::Half / c10::BFloat16 classes. On x86-64 with AVX2 both mostly take update_in_registers (below) instead.
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
  // c10::detail::round_to_nearest_even's arithmetic, with its NaN test as a select rather than an early return:
  // gcc vectorises this, not that.
  static uint16_t store(float v) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    const uint16_t rounded = static_cast<uint16_t>((u + ((u >> 16) & 1u) + 0x7fffu) >> 16);
    return v != v ? uint16_t{0x7fc0} : rounded;
  }
};

// One x86-64 build uses the widest vectors the CPU has: gcc emits a clone of the loop per target and picks one at
// load time. Every clone gives the same bits, since contraction into FMA is off (setup.py).
#if defined(__x86_64__) && !defined(__clang__) && __GNUC__ >= 12
#define NAG_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NAG_VECTOR_CLONES
#endif

// One block's slice: p, grad and buf as stored, the float32 master weights (Mode::kMaster) or each element's random
// bits (Mode::kStochastic). The same loop for every kind, plain enough to vectorise.
template <bool kFirst, bool kDecay, bool kFused, Mode kMode, typename P, typename B,
          typename SP = typename Io<P>::Storage,
          typename SB = typename Io<B>::Storage, typename M = typename Io<P>::Math>
NAG_VECTOR_CLONES void update_chunk(SP* __restrict__ p, const SP* __restrict__ g, SB* __restrict__ b,
                                    float* __restrict__ master, int64_t n, const Hyper<M>& h,
                                    const uint32_t* __restrict__ random) {
  const Hyper<M> hyper = h;  // a local copy: provably unchanged by the stores, so the loop stays branch-free
  for (int64_t i = 0; i < n; ++i) {
    M pm;
    if constexpr (kMode == Mode::kMaster) {
      pm = master[i];
    } else {
      pm = Io<P>::load(p[i]);
    }
    M bm = kFirst ? M(0) : Io<B>::load(b[i]);
    nag_update<kFirst, kDecay, kFused>(pm, Io<P>::load(g[i]), bm, hyper);
    if constexpr (kMode == Mode::kMaster) master[i] = pm;
    if constexpr (kMode == Mode::kStochastic) {
      p[i] = bfloat16_bits_stochastic(pm, random[i]);
    } else {
      p[i] = Io<P>::store(pm);
    }
    b[i] = Io<B>::store(bm);
  }
}

// Stochastic rounding: the random bits of elements [first, first + n) of a segment (see derive_key).
NAG_VECTOR_CLONES void random_bits(uint32_t* __restrict__ out, int64_t n, uint64_t key, int64_t first) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(derive_key(key, first + i));
}

// GradScaler: grads unscaled in place.
template <typename T, typename S = typename Io<T>::Storage, typename M = typename Io<T>::Math>
NAG_VECTOR_CLONES void unscale_chunk(S* __restrict__ g, int64_t n, float inv_scale) {
  for (int64_t i = 0; i < n; ++i) g[i] = Io<T>::store(unscale(Io<T>::load(g[i]), inv_scale));
}

// Clipping: a block's grads times the coefficient, rounded to their dtype (see clip), into a tile that the update
// then reads in their place. The block's grads are read from memory once, and the tile stays in the core's cache.
template <typename T, typename S = typename Io<T>::Storage>
NAG_VECTOR_CLONES void clip_chunk(const S* __restrict__ g, S* __restrict__ out, int64_t n, float coef) {
  for (int64_t i = 0; i < n; ++i) out[i] = Io<T>::store(clip(Io<T>::load(g[i]), coef));
}

// The norm's partial result of n grads (see norm_term), in double: eight running results, which gcc vectorises,
// combined in a fixed order, so the result does not depend on the thread count.
template <NormKind K, typename T, typename S = typename Io<T>::Storage>
NAG_VECTOR_CLONES double norm_chunk(const S* __restrict__ g, int64_t n, float inv_scale, double p) {
  double acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      const double x = unscale(Io<T>::load(g[i + j]), inv_scale);
      acc[j] = norm_combine<K>(acc[j], norm_term<K>(x, p));
    }
  }
  for (; i < n; ++i) acc[0] = norm_combine<K>(acc[0], norm_term<K>(double(unscale(Io<T>::load(g[i]), inv_scale)), p));
  double total = acc[0];
  for (int j = 1; j < 8; ++j) total = norm_combine<K>(total, acc[j]);
  return total;
}

#if defined(__x86_64__) && defined(__GNUC__)
// float16 and bfloat16 on AVX2: 16 elements at a time converted in registers around the shared math, where gcc turns
// each line of nag_update into 8-wide instructions. (Its own vectorisation of the Io conversions does not handle
// float16 at all, and spends more instructions on bfloat16, whose loop is then compute-bound.)
#define NAG_AVX2 __attribute__((target("avx2,fma,f16c")))

bool has_avx2() {
  static const bool yes =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return yes;
}

// 16 stored elements to floats and back, with the same bits as Io<T>'s conversions. The order of the floats is the
// type's choice, since the math is elementwise; kInOrder says whether it is the elements' own, which float32 arrays
// beside them (master weights, a float32 buffer) need.
template <typename T> struct Lanes;

template <> struct Lanes<c10::Half> {  // F16C, 8 at a time
  static constexpr bool kInOrder = true;
  NAG_AVX2 static void load(const uint16_t* src, float* dst) {
    for (int k = 0; k < 16; k += 8) {
      _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
    }
  }
  NAG_AVX2 static void store(const float* src, uint16_t* dst) {
    for (int k = 0; k < 16; k += 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT));
    }
  }
};

template <> struct Lanes<c10::BFloat16> {  // the even elements, then the odd ones: one instruction each way
  static constexpr bool kInOrder = false;
  NAG_AVX2 static void load(const uint16_t* src, float* dst) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_slli_epi32(x, 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 8), _mm256_and_si256(x, _mm256_set1_epi32(0xffff0000)));
  }
  // Io<c10::BFloat16>::store's rounding, kept in the high half of each 32-bit lane.
  NAG_AVX2 static __m256i round_high(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(u, odd), _mm256_set1_epi32(0x7fff));
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc00000), _mm256_castps_si256(nan));
  }
  NAG_AVX2 static void store(const float* src, uint16_t* dst) {
    const __m256i even = _mm256_srli_epi32(round_high(_mm256_loadu_ps(src)), 16);
    const __m256i odd = round_high(_mm256_loadu_ps(src + 8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_blend_epi16(even, odd, 0xaa));
  }
};

// Which kinds take this path: float16 in every mode, bfloat16 where every array is bfloat16 (see kInOrder).
template <typename P, typename B, Mode kMode>
constexpr bool kInRegisters = std::is_same_v<P, c10::Half> ||
                              (std::is_same_v<P, c10::BFloat16> && std::is_same_v<B, c10::BFloat16> &&
                               kMode == Mode::kPlain);

// Sixteen elements: the 16-bit params (or the float32 master), grads and buffers (16-bit or float32) in registers.
template <bool kFirst, bool kDecay, bool kFused, Mode kMode, typename P, typename SB>
NAG_AVX2 inline void update16(uint16_t* p, const uint16_t* g, SB* b, float* master, const Hyper<float>& h) {
  using L = Lanes<P>;
  constexpr bool kStoredBuffer = std::is_same_v<SB, uint16_t>;
  static_assert(L::kInOrder || (kMode != Mode::kMaster && kStoredBuffer), "float32 arrays need the elements' order");
  float pf[16], gf[16], bf[16];
  if constexpr (kMode == Mode::kMaster) {
    std::memcpy(pf, master, sizeof(pf));
  } else {
    L::load(p, pf);
  }
  L::load(g, gf);
  if constexpr (kStoredBuffer) {
    if (!kFirst) L::load(b, bf);
  } else {
    std::memcpy(bf, b, sizeof(bf));
  }
#pragma GCC unroll 1  // a loop, which gcc vectorises; unrolled, its maximize select stays scalar
  for (int j = 0; j < 16; ++j) {
    if (kFirst) bf[j] = 0.0f;
    nag_update<kFirst, kDecay, kFused>(pf[j], gf[j], bf[j], h);
  }
  if constexpr (kMode == Mode::kMaster) std::memcpy(master, pf, sizeof(pf));
  L::store(pf, p);
  if constexpr (kStoredBuffer) {
    L::store(bf, b);
  } else {
    std::memcpy(b, bf, sizeof(bf));
  }
}

template <bool kFirst, bool kDecay, bool kFused, Mode kMode, typename P, typename B, typename SB>
NAG_AVX2 void update_in_registers(uint16_t* p, const uint16_t* g, SB* b, float* master, int64_t n,
                                  const Hyper<float>& h) {
  const Hyper<float> hyper = h;  // a local copy, as in update_chunk
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    update16<kFirst, kDecay, kFused, kMode, P>(p + i, g + i, b + i, kMode == Mode::kMaster ? master + i : nullptr,
                                               hyper);
  }
  // The last n % 16 elements one at a time, with the same bits (a small tensor, a bias, is often all remainder).
  if (i < n) {
    update_chunk<kFirst, kDecay, kFused, kMode, P, B>(p + i, g + i, b + i, kMode == Mode::kMaster ? master + i : nullptr,
                                                      n - i, hyper, nullptr);
  }
}

// 16-bit grads through f (GradScaler's unscale, clipping's multiply) into dst, which may be src: unscale_chunk's and
// clip_chunk's math, 16 at a time (gcc's loops convert float16 one element at a time).
template <typename P, typename F>
NAG_AVX2 void map_in_registers(const uint16_t* src, uint16_t* dst, int64_t n, F f) {
  int64_t i = 0;
  float gf[16];
  for (; i + 16 <= n; i += 16) {
    Lanes<P>::load(src + i, gf);
    for (int j = 0; j < 16; ++j) gf[j] = f(gf[j]);
    Lanes<P>::store(gf, dst + i);
  }
  for (; i < n; ++i) dst[i] = Io<P>::store(f(Io<P>::load(src[i])));
}

// The norm's partial result of 16-bit grads, 16 at a time: sixteen running results, in the lanes' order, combined in
// a fixed order.
template <NormKind K, typename P>
NAG_AVX2 double norm_in_registers(const uint16_t* g, int64_t n, float inv_scale, double p) {
  double acc[16] = {};
  float gf[16];
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    Lanes<P>::load(g + i, gf);
    for (int j = 0; j < 16; ++j) acc[j] = norm_combine<K>(acc[j], norm_term<K>(double(unscale(gf[j], inv_scale)), p));
  }
  for (; i < n; ++i) acc[0] = norm_combine<K>(acc[0], norm_term<K>(double(unscale(Io<P>::load(g[i]), inv_scale)), p));
  double total = acc[0];
  for (int j = 1; j < 16; ++j) total = norm_combine<K>(total, acc[j]);
  return total;
}
#endif

// A block's grads clipped into `out`, and the norm's partial result of a block: in registers where the CPU allows.
template <typename P, typename SP>
void clip_span(const SP* g, SP* out, int64_t n, float coef) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<P, c10::Half> || std::is_same_v<P, c10::BFloat16>) {
    if (has_avx2()) return map_in_registers<P>(g, out, n, [=](float x) { return clip(x, coef); });
  }
#endif
  clip_chunk<P>(g, out, n, coef);
}

template <NormKind K, typename P, typename SP>
double norm_span(const SP* g, int64_t n, float inv_scale, double p) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<P, c10::Half> || std::is_same_v<P, c10::BFloat16>) {
    if (has_avx2()) return norm_in_registers<K, P>(g, n, inv_scale, p);
  }
#endif
  return norm_chunk<K, P>(g, n, inv_scale, p);
}

// One block's elements with its compile-time flags: through float16 tiles, random-bit tiles or directly.
template <bool kFirst, bool kDecay, bool kFused, Mode kMode, typename P, typename B, typename SP, typename SB,
          typename M>
void update_span(SP* p, const SP* g, SB* b, float* master, int64_t n, const Hyper<M>& h, uint64_t key,
                 int64_t begin) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (kInRegisters<P, B, kMode>) {
    if (has_avx2()) return update_in_registers<kFirst, kDecay, kFused, kMode, P, B>(p, g, b, master, n, h);
  }
#endif
  if constexpr (kMode == Mode::kStochastic) {  // the random bits a tile at a time: the hash vectorises on its own,
    constexpr int64_t kTile = 1024;           // not inside the update loop
    uint32_t random[kTile];
    for (int64_t i = 0; i < n; i += kTile) {
      const int64_t m = std::min(kTile, n - i);
      random_bits(random, m, key, begin + i);
      update_chunk<kFirst, kDecay, kFused, kMode, P, B>(p + i, g + i, b + i, nullptr, m, h, random);
    }
  } else {
    update_chunk<kFirst, kDecay, kFused, kMode, P, B>(p, g, b, master, n, h, nullptr);
  }
}

// GradScaler: the block's grads unscaled in place (then still in cache for the update).
template <typename P, typename SP>
void unscale_span(SP* g, int64_t n, float inv_scale) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<P, c10::Half> || std::is_same_v<P, c10::BFloat16>) {
    if (has_avx2()) return map_in_registers<P>(g, g, n, [=](float x) { return unscale(x, inv_scale); });
  }
#endif
  unscale_chunk<P>(g, n, inv_scale);
}

// Calls f(std::true_type) or f(std::false_type): a runtime flag made a compile-time one.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// A launch this small runs on the calling thread: waking the pool costs more than the work (at::internal::GRAIN_SIZE).
constexpr int64_t kGrainSize = 32768;

// Blocks [begin, end) of one launch, with the launch's compile-time flags (weight decay, fused multiply-add). The
// blocks of a range come in segment order, so the range finds its first segment with the kernels' lookup
// (block_work) and walks on from there: a step of many small tensors has a block per tensor, and a lookup for each
// cost more than the update.
template <bool kDecay, bool kFused, Mode kMode, typename P, typename B, typename SP, typename SB, typename M>
void update_blocks(const LaunchTable& t, int64_t begin, int64_t end, const Hyper<M>& h, const float* inv_scale,
                   const float* coef, uint64_t launch_key) {
  // (one tile per thread, made at its first clipped step and kept: a step allocates nothing)
  thread_local std::unique_ptr<SP[]> clipped;
  if (coef != nullptr && clipped == nullptr) clipped.reset(new SP[kChunk]);
  BlockWork w = block_work(t.block_start, t.numel, t.size, begin);
  for (int64_t block = begin; block < end; ++block) {
    if (block >= t.block_start[w.segment + 1]) {
      ++w.segment;  // (segments are never empty: the next block starts the next one)
      w.begin = 0;
    } else if (block > begin) {
      w.begin += kChunk;
    }
    const int seg = w.segment;
    w.end = std::min(w.begin + kChunk, t.numel[seg]);
    if (seg + 4 < t.size) {  // (the next small tensors' values: separate allocations the hardware cannot guess)
      __builtin_prefetch(t.param[seg + 4]);
      __builtin_prefetch(t.grad[seg + 4]);
      __builtin_prefetch(t.buf[seg + 4]);
      if (kMode == Mode::kMaster) __builtin_prefetch(t.master[seg + 4]);
    }
    SP* p = static_cast<SP*>(t.param[seg]) + w.begin;
    SP* g = static_cast<SP*>(t.grad[seg]) + w.begin;
    SB* b = static_cast<SB*>(t.buf[seg]) + w.begin;
    float* master = kMode == Mode::kMaster ? static_cast<float*>(t.master[seg]) + w.begin : nullptr;
    const uint64_t key = kMode == Mode::kStochastic ? derive_key(launch_key, seg) : 0;
    const int64_t n = w.end - w.begin;
    if (inv_scale != nullptr) unscale_span<P>(g, n, *inv_scale);
    if (coef != nullptr) {
      clip_span<P>(g, clipped.get(), n, *coef);
      g = clipped.get();
    }
    if (t.first[seg] != 0) {
      update_span<true, kDecay, kFused, kMode, P, B>(p, g, b, master, n, h, key, w.begin);
    } else {
      update_span<false, kDecay, kFused, kMode, P, B>(p, g, b, master, n, h, key, w.begin);
    }
  }
}

template <typename P, typename B, Mode kMode>
void run(const GroupView& group, const StepArgs& a) {
  using SP = typename Io<P>::Storage;
  using SB = typename Io<B>::Storage;
  using M = typename Io<P>::Math;
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // GradScaler found inf/nan: skip the step
  if (a.grad_coef != nullptr && std::isnan(*a.grad_coef)) return;  // a non-finite grad norm: skip it too
  const float inv_scale = a.inv_grad_scale != nullptr ? *a.inv_grad_scale : 1.0f;
  const double lr = a.lr_tensor == nullptr ? a.lr
                    : a.lr_tensor_is_double ? *static_cast<const double*>(a.lr_tensor)
                                            : *static_cast<const float*>(a.lr_tensor);
  const Hyper<M> h{M(lr), M(a.momentum), M(a.weight_decay), a.maximize, a.weight_decay != 0.0};
  LaunchTable table;
  for_each_table(group, a, table, [&](const LaunchTable& t, uint64_t launch_key) {
    const int64_t blocks = t.block_start[t.size];
    int64_t elements = 0;
    for (int s = 0; s < t.size; ++s) elements += t.numel[s];
    const int64_t grain = elements <= kGrainSize ? blocks : 1;
    with_flag(h.decay, [&](auto decay) {
      with_flag(a.fused_multiply_add, [&](auto fused) {
        torch::stable::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
          update_blocks<decltype(decay)::value, decltype(fused)::value, kMode, P, B, SP, SB>(
              t, begin, end, h, a.inv_grad_scale != nullptr ? &inv_scale : nullptr, a.grad_coef, launch_key);
        });
      });
    });
  });
}

template <typename T>
void norm(const GroupView& group, NormKind kind, float p, const float* inv_grad_scale, double* partials) {
  using S = typename Io<T>::Storage;
  const float inv_scale = inv_grad_scale != nullptr ? *inv_grad_scale : 1.0f;
  const StepArgs no_args{};
  int64_t first_block = 0;  // of the launch, in the step's order of blocks
  LaunchTable table;
  for_each_table(group, no_args, table, [&](const LaunchTable& t, uint64_t) {
    const int64_t blocks = t.block_start[t.size];
    int64_t elements = 0;
    for (int s = 0; s < t.size; ++s) elements += t.numel[s];
    const int64_t grain = elements <= kGrainSize ? blocks : 1;
    torch::stable::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        const BlockWork w = block_work(t.block_start, t.numel, t.size, block);
        const S* g = static_cast<const S*>(t.grad[w.segment]) + w.begin;
        const int64_t n = w.end - w.begin;
        visit_norm(kind, [&](auto k) {
          partials[first_block + block] = norm_span<decltype(k)::value, T>(g, n, inv_scale, p);
        });
      }
    });
    first_block += blocks;
  });
}

}  // namespace

void norm_cpu(const GroupView& grads, NormKind kind, float p, const float* inv_grad_scale, double* partials) {
  switch (grads.kind.param) {
    case Dtype::kFloat: return norm<float>(grads, kind, p, inv_grad_scale, partials);
    case Dtype::kDouble: return norm<double>(grads, kind, p, inv_grad_scale, partials);
    case Dtype::kHalf: return norm<c10::Half>(grads, kind, p, inv_grad_scale, partials);
    case Dtype::kBFloat16: return norm<c10::BFloat16>(grads, kind, p, inv_grad_scale, partials);
  }
}

void run_cpu(const GroupView& group, const StepArgs& args) {
  const bool known = visit_kind<float, double, c10::Half, c10::BFloat16>(group.kind, [&](auto p, auto b, auto mode) {
    run<typename decltype(p)::type, typename decltype(b)::type, decltype(mode)::value>(group, args);
  });
  if (!known) throw std::runtime_error("nag_cuda: no CPU kernel for this combination of dtypes and mode");
}

}  // namespace nag
