// The CPU kernel: runs the same schedule as the CUDA kernel, one parallel task per range of blocks, and the same
// per-element math (nag_math.h). The inner loop is plain enough for the compiler to vectorise (see setup.py).
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "nag_group.h"
#include "nag_math.h"

namespace nag {
namespace {

template <typename T> struct Math { using type = T; };
template <> struct Math<c10::Half> { using type = float; };
template <> struct Math<c10::BFloat16> { using type = float; };

template <bool kFirst, typename T, typename M>
__attribute__((target_clones("avx512f", "avx2", "default"))) void update_chunk(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ b, int64_t n, const Hyper<M>& h) {
  for (int64_t i = 0; i < n; ++i) {
    M pm = static_cast<M>(p[i]);
    M bm = kFirst ? M(0) : static_cast<M>(b[i]);
    nag_update<kFirst>(pm, static_cast<M>(g[i]), bm, h);
    p[i] = static_cast<T>(pm);
    b[i] = static_cast<T>(bm);
  }
}

template <typename T>
void run(const Group& group, const StepArgs& a) {
  using M = typename Math<T>::type;
  const Hyper<M> h{M(a.lr), M(a.momentum), M(a.weight_decay), a.maximize};
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
        T* p = static_cast<T*>(t.param[w.segment]) + w.begin;
        const T* g = static_cast<const T*>(t.grad[w.segment]) + w.begin;
        T* b = static_cast<T*>(t.buf[w.segment]) + w.begin;
        if (t.first[w.segment]) {
          update_chunk<true>(p, g, b, w.end - w.begin, h);
        } else {
          update_chunk<false>(p, g, b, w.end - w.begin, h);
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
