// The CUDA kernel: one launch updates every segment of a LaunchTable (see nag_schedule.h), one block per chunk.
// Only CUDA and this project's headers are included, so CI compiles this file with nvcc without torch's CUDA headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "nag_launch.h"
#include "nag_math.h"
#include "nag_schedule.h"

namespace nag {
namespace {

constexpr int kThreads = 256;

static_assert(sizeof(LaunchTable) + sizeof(Hyper<double>) + 6 * sizeof(void*) <= 32764,
              "kernel arguments must fit CUDA's 32 KiB parameter limit (CUDA 12.1+, sm_70+)");
static_assert(kChunk % 8 == 0, "a chunk must keep 16-byte alignment for every dtype");

// Loading and storing tensor elements in the math type: math in float for half/bfloat16, rounded once on store.
template <typename T> struct Math { using type = T; };
template <> struct Math<__half> { using type = float; };
template <> struct Math<__nv_bfloat16> { using type = float; };

__device__ __forceinline__ float to_math(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_math(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_math(float x) { return x; }
__device__ __forceinline__ double to_math(double x) { return x; }
template <typename T> __device__ __forceinline__ T from_math(typename Math<T>::type x);
template <> __device__ __forceinline__ __half from_math<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_math<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ float from_math<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_math<double>(double x) { return x; }

__device__ __forceinline__ __nv_bfloat16 stochastic_bfloat16(float x, uint32_t random) {
  return __ushort_as_bfloat16(bfloat16_bits_stochastic(x, random));
}

// N elements of one tensor, loaded and stored with one instruction (16 bytes for the widest type of a kind).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ bool aligned(const T* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % (sizeof(T) * N) == 0;
}

// The tensors one block updates, each at the block's first element. master is float32 and used in Mode::kMaster
// only; key is the segment's random-bits key, used in Mode::kStochastic only.
template <typename P, typename B>
struct Slice {
  P* p;
  P* g;
  B* b;
  float* master;
  uint64_t key;
  int64_t begin;  // the block's first element within its segment: the random bits' counter
  float coef;     // clipping (kClip): the grads' coefficient
};

// Elements [i, i + N) of a slice: loaded, updated by nag_update (nag_math.h), rounded once and stored.
template <bool kFirst, Mode kMode, bool kClip, int N, typename P, typename B, typename M>
__device__ __forceinline__ void update_pack(const Slice<P, B>& s, int64_t i, const Hyper<M>& h) {
  Pack<P, N> pv;
  Pack<float, N> mv;
  Pack<B, N> bv;
  if (kMode == Mode::kMaster) {
    mv = *reinterpret_cast<const Pack<float, N>*>(s.master + i);
  } else {
    pv = *reinterpret_cast<const Pack<P, N>*>(s.p + i);
  }
  const Pack<P, N> gv = *reinterpret_cast<const Pack<P, N>*>(s.g + i);
  if (!kFirst) bv = *reinterpret_cast<const Pack<B, N>*>(s.b + i);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    M pm = kMode == Mode::kMaster ? mv.v[k] : to_math(pv.v[k]);
    M bm = kFirst ? M(0) : to_math(bv.v[k]);
    // (clipped as clip_grad_norm_'s in-place multiply leaves the grad: rounded to its dtype)
    const M gm = kClip ? to_math(from_math<P>(clip(to_math(gv.v[k]), s.coef))) : to_math(gv.v[k]);
    if (h.decay) {  // the same for every thread: no divergence
      nag_update<kFirst, true>(pm, gm, bm, h);
    } else {
      nag_update<kFirst, false>(pm, gm, bm, h);
    }
    if constexpr (kMode == Mode::kMaster) mv.v[k] = pm;
    if constexpr (kMode == Mode::kStochastic) {
      pv.v[k] = stochastic_bfloat16(pm, static_cast<uint32_t>(derive_key(s.key, s.begin + i + k)));
    } else {
      pv.v[k] = from_math<P>(pm);
    }
    bv.v[k] = from_math<B>(bm);
  }
  if (kMode == Mode::kMaster) *reinterpret_cast<Pack<float, N>*>(s.master + i) = mv;
  *reinterpret_cast<Pack<P, N>*>(s.p + i) = pv;
  *reinterpret_cast<Pack<B, N>*>(s.b + i) = bv;
}

// Elements [0, n) of one chunk: vectors where every pointer allows it, scalars for the rest.
template <bool kFirst, Mode kMode, bool kClip, typename P, typename B, typename M>
__device__ __forceinline__ void update_chunk(const Slice<P, B>& s, int64_t n, const Hyper<M>& h) {
  constexpr size_t kWidest = sizeof(P) > sizeof(B) ? sizeof(P) : sizeof(B);
  constexpr int N = 16 / (kMode == Mode::kMaster && kWidest < 4 ? 4 : kWidest);
  int64_t vec_end = 0;
  if (aligned<P, N>(s.p) && aligned<P, N>(s.g) && aligned<B, N>(s.b) &&
      (kMode != Mode::kMaster || aligned<float, N>(s.master))) {
    vec_end = n - n % N;
    for (int64_t i = int64_t(threadIdx.x) * N; i < vec_end; i += int64_t(kThreads) * N) {
      update_pack<kFirst, kMode, kClip, N>(s, i, h);
    }
  }
  for (int64_t i = vec_end + threadIdx.x; i < n; i += kThreads) update_pack<kFirst, kMode, kClip, 1>(s, i, h);
}

// GradScaler: the chunk's grads unscaled in place (rounded to their dtype, as torch.amp.GradScaler.unscale_ leaves
// them) before the update reads them; the chunk is still in L2 then.
template <typename T>
__device__ __forceinline__ void unscale_chunk(T* g, int64_t n, float inv_scale) {
  for (int64_t i = threadIdx.x; i < n; i += kThreads) g[i] = from_math<T>(unscale(to_math(g[i]), inv_scale));
}

// NOTE: __grid_constant__ guarantees that blocks read the 32 KiB table where it is, in kernel-parameter memory,
// with a dynamic index; a copy into each thread's local memory would cost more than the update itself.
template <typename P, typename B, Mode kMode, bool kScaled, bool kClip>
__global__ void __launch_bounds__(kThreads)
    nag_kernel(const __grid_constant__ LaunchTable table, Hyper<typename Math<P>::type> h,
               const float* inv_grad_scale, const float* found_inf, const void* lr_tensor, bool lr_is_double,
               const float* grad_coef, uint64_t launch_key) {
  using M = typename Math<P>::type;
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // GradScaler found inf/nan: skip the step
  const float coef = kClip ? *grad_coef : 1.0f;
  if (coef != coef) return;  // a non-finite grad norm (max_grad_norm): skip the step too
  if (lr_tensor != nullptr) {  // as a float lr is converted: through double (exact for float32)
    h.lr = static_cast<M>(lr_is_double ? *static_cast<const double*>(lr_tensor)
                                       : static_cast<double>(*static_cast<const float*>(lr_tensor)));
  }
  const BlockWork w = block_work(table.block_start, table.numel, table.size, blockIdx.x);
  const int seg = w.segment;
  const Slice<P, B> s{static_cast<P*>(table.param[seg]) + w.begin, static_cast<P*>(table.grad[seg]) + w.begin,
                      static_cast<B*>(table.buf[seg]) + w.begin,
                      kMode == Mode::kMaster ? static_cast<float*>(table.master[seg]) + w.begin : nullptr,
                      kMode == Mode::kStochastic ? derive_key(launch_key, seg) : 0, w.begin, coef};
  const int64_t n = w.end - w.begin;
  if (kScaled) {
    unscale_chunk(s.g, n, *inv_grad_scale);
    __syncthreads();  // the update below reads grads that other threads of the block unscaled
  }
  if (table.first[seg]) {
    update_chunk<true, kMode, kClip>(s, n, h);
  } else {
    update_chunk<false, kMode, kClip>(s, n, h);
  }
}

template <typename P, typename B, Mode kMode>
const char* launch(const LaunchTable& table, const StepArgs& a, uint64_t launch_key, cudaStream_t stream) {
  using M = typename Math<P>::type;
  const Hyper<M> h{M(a.lr), M(a.momentum), M(a.weight_decay), a.maximize, a.weight_decay != 0.0};
  const unsigned blocks = static_cast<unsigned>(table.block_start[table.size]);
  auto go = [&](auto scaled, auto clipped) {
    nag_kernel<P, B, kMode, decltype(scaled)::value, decltype(clipped)::value><<<blocks, kThreads, 0, stream>>>(
        table, h, a.inv_grad_scale, a.found_inf, a.lr_tensor, a.lr_tensor_is_double, a.grad_coef, launch_key);
  };
  using Yes = std::true_type;
  using No = std::false_type;
  if (a.inv_grad_scale != nullptr) {
    a.grad_coef != nullptr ? go(Yes{}, Yes{}) : go(Yes{}, No{});
  } else {
    a.grad_coef != nullptr ? go(No{}, Yes{}) : go(No{}, No{});
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// The norm's partial result of one block's grads (see norm_term): accumulated per thread in the math type, then
// combined across the block in shared memory, in a fixed order (the same result at every run).
template <typename T, NormKind K>
__global__ void __launch_bounds__(kThreads)
    norm_kernel(const __grid_constant__ LaunchTable table, float p, const float* inv_grad_scale, float* partials) {
  using M = typename Math<T>::type;
  const BlockWork w = block_work(table.block_start, table.numel, table.size, blockIdx.x);
  const T* g = static_cast<const T*>(table.grad[w.segment]) + w.begin;
  const int64_t n = w.end - w.begin;
  const float inv_scale = inv_grad_scale != nullptr ? *inv_grad_scale : 1.0f;
  M acc = M(0);
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    acc = norm_combine<K>(acc, norm_term<K>(unscale(to_math(g[i]), inv_scale), M(p)));
  }
  __shared__ M shared[kThreads];
  shared[threadIdx.x] = acc;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) shared[threadIdx.x] = norm_combine<K>(shared[threadIdx.x], shared[threadIdx.x + half]);
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = static_cast<float>(shared[0]);
}

template <typename T>
const char* norm_launch(const LaunchTable& table, NormKind kind, float p, const float* inv_grad_scale,
                        float* partials, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(table.block_start[table.size]);
  visit_norm(kind, [&](auto k) {
    norm_kernel<T, decltype(k)::value><<<blocks, kThreads, 0, stream>>>(table, p, inv_grad_scale, partials);
  });
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* cuda_norm_launch(const LaunchTable& table, Dtype grad, NormKind kind, float p,
                             const float* inv_grad_scale, float* partials, void* stream) {
  if (table.size == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (grad) {
    case Dtype::kFloat: return norm_launch<float>(table, kind, p, inv_grad_scale, partials, s);
    case Dtype::kDouble: return norm_launch<double>(table, kind, p, inv_grad_scale, partials, s);
    case Dtype::kHalf: return norm_launch<__half>(table, kind, p, inv_grad_scale, partials, s);
    case Dtype::kBFloat16: return norm_launch<__nv_bfloat16>(table, kind, p, inv_grad_scale, partials, s);
  }
  return "nag_cuda: no norm kernel for this dtype";
}

const char* cuda_launch(const LaunchTable& table, const Kind& kind, const StepArgs& args, uint64_t launch_key,
                        void* stream) {
  if (table.size == 0) return nullptr;
  const char* err = nullptr;
  const bool known = visit_kind<float, double, __half, __nv_bfloat16>(kind, [&](auto p, auto b, auto mode) {
    err = launch<typename decltype(p)::type, typename decltype(b)::type, decltype(mode)::value>(
        table, args, launch_key, static_cast<cudaStream_t>(stream));
  });
  return known ? err : "nag_cuda: no kernel for this combination of dtypes and mode";
}

#define NAG_STRINGIFY_(...) #__VA_ARGS__
#define NAG_STRINGIFY(...) NAG_STRINGIFY_(__VA_ARGS__)
const char* cuda_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return NAG_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

}  // namespace nag
