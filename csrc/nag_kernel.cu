// The CUDA kernel: one launch updates every segment of a LaunchTable (see nag_schedule.h), one block per chunk.
// Only CUDA and this project's headers are included, so CI compiles this file with nvcc without torch's CUDA headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "nag_launch.h"
#include "nag_math.h"
#include "nag_schedule.h"

namespace nag {
namespace {

constexpr int kThreads = 256;

static_assert(sizeof(LaunchTable) + sizeof(Hyper<double>) + 4 * sizeof(void*) <= 32764,
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

// 16 bytes of elements, loaded and stored with one vector instruction.
template <typename T>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

__device__ __forceinline__ bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <bool kFirst, typename T>
__device__ __forceinline__ void update_one(T* p, const T* g, T* b, int64_t i, const Hyper<typename Math<T>::type>& h) {
  using M = typename Math<T>::type;
  M pm = to_math(p[i]);
  M bm = kFirst ? M(0) : to_math(b[i]);
  nag_update<kFirst>(pm, to_math(g[i]), bm, h);
  p[i] = from_math<T>(pm);
  b[i] = from_math<T>(bm);
}

// Elements [0, n) of one chunk: 16-byte vectors where all three pointers allow it, scalars for the rest.
template <bool kFirst, typename T>
__device__ __forceinline__ void update_chunk(T* p, const T* g, T* b, int64_t n, const Hyper<typename Math<T>::type>& h) {
  using M = typename Math<T>::type;
  using V = Vec<T>;
  int64_t vec_end = 0;
  if (aligned16(p) && aligned16(g) && aligned16(b)) {
    vec_end = n - n % V::kSize;
    for (int64_t i = int64_t(threadIdx.x) * V::kSize; i < vec_end; i += int64_t(kThreads) * V::kSize) {
      V pv = *reinterpret_cast<const V*>(p + i);
      const V gv = *reinterpret_cast<const V*>(g + i);
      V bv;
      if (!kFirst) bv = *reinterpret_cast<const V*>(b + i);
#pragma unroll
      for (int k = 0; k < V::kSize; ++k) {
        M pm = to_math(pv.v[k]);
        M bm = kFirst ? M(0) : to_math(bv.v[k]);
        nag_update<kFirst>(pm, to_math(gv.v[k]), bm, h);
        pv.v[k] = from_math<T>(pm);
        bv.v[k] = from_math<T>(bm);
      }
      *reinterpret_cast<V*>(p + i) = pv;
      *reinterpret_cast<V*>(b + i) = bv;
    }
  }
  for (int64_t i = vec_end + threadIdx.x; i < n; i += kThreads) {
    update_one<kFirst>(p, g, b, i, h);
  }
}

// GradScaler: the chunk's grads unscaled in place (rounded to their dtype, as torch.amp.GradScaler.unscale_ leaves
// them) before the update reads them; the chunk is still in L2 then.
template <typename T>
__device__ __forceinline__ void unscale_chunk(T* g, int64_t n, float inv_scale) {
  for (int64_t i = threadIdx.x; i < n; i += kThreads) g[i] = from_math<T>(unscale(to_math(g[i]), inv_scale));
}

// NOTE: __grid_constant__ guarantees that blocks read the 32 KiB table where it is, in kernel-parameter memory,
// with a dynamic index; a copy into each thread's local memory would cost more than the update itself.
template <typename T, bool kScaled>
__global__ void __launch_bounds__(kThreads)
    nag_kernel(const __grid_constant__ LaunchTable table, Hyper<typename Math<T>::type> h,
               const float* inv_grad_scale, const float* found_inf, const void* lr_tensor, bool lr_is_double) {
  using M = typename Math<T>::type;
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // GradScaler found inf/nan: skip the step
  if (lr_tensor != nullptr) {  // as a float lr is converted: through double (exact for float32)
    h.lr = static_cast<M>(lr_is_double ? *static_cast<const double*>(lr_tensor)
                                       : static_cast<double>(*static_cast<const float*>(lr_tensor)));
  }
  const BlockWork w = block_work(table.block_start, table.numel, table.size, blockIdx.x);
  const int64_t offset = w.begin;
  T* p = static_cast<T*>(table.param[w.segment]) + offset;
  T* g = static_cast<T*>(table.grad[w.segment]) + offset;
  T* b = static_cast<T*>(table.buf[w.segment]) + offset;
  if (kScaled) {
    unscale_chunk(g, w.end - w.begin, *inv_grad_scale);
    __syncthreads();  // the update below reads grads that other threads of the block unscaled
  }
  if (table.first[w.segment]) {
    update_chunk<true>(p, g, b, w.end - w.begin, h);
  } else {
    update_chunk<false>(p, g, b, w.end - w.begin, h);
  }
}

template <typename T>
const char* launch(const LaunchTable& table, const StepArgs& a, cudaStream_t stream) {
  using M = typename Math<T>::type;
  const Hyper<M> h{M(a.lr), M(a.momentum), M(a.weight_decay), a.maximize};
  const unsigned blocks = static_cast<unsigned>(table.block_start[table.size]);
  if (a.inv_grad_scale != nullptr) {
    nag_kernel<T, true><<<blocks, kThreads, 0, stream>>>(table, h, a.inv_grad_scale, a.found_inf, a.lr_tensor,
                                                         a.lr_tensor_is_double);
  } else {
    nag_kernel<T, false><<<blocks, kThreads, 0, stream>>>(table, h, nullptr, a.found_inf, a.lr_tensor,
                                                          a.lr_tensor_is_double);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* cuda_launch(const LaunchTable& table, Dtype dtype, const StepArgs& args, void* stream) {
  if (table.size == 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case Dtype::kFloat: return launch<float>(table, args, s);
    case Dtype::kDouble: return launch<double>(table, args, s);
    case Dtype::kHalf: return launch<__half>(table, args, s);
    case Dtype::kBFloat16: return launch<__nv_bfloat16>(table, args, s);
  }
  return "nag_cuda: unknown dtype";
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
