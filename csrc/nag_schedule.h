// The launch schedule: which block of which launch updates which slice of which tensor.
//
// One launch updates many tensors. The host cuts each tensor into chunks of kChunk elements, one block per chunk,
// and fills a LaunchTable (passed by value as the kernel argument) with one entry per tensor slice ("segment") and
// the index of each segment's first block. A block finds its segment by binary search over those indices, so a
// launch needs no per-block table and holds any number of blocks; it is limited only by kMaxSegments entries.
// A group with more tensors than that, or with more blocks than max_blocks, is split into several launches.
//
// This header includes nothing from torch or CUDA: the CUDA kernel, the CPU kernel (which runs the same schedule
// block by block, a range of blocks per parallel task) and the test-only op nag_cuda::_plan all use it, so tests
// check the indexing on CPU.
#pragma once

#include <cstdint>

#include "nag_math.h"

namespace nag {

// Elements per block. A multiple of every vector width (16 bytes / element size), so that a segment that starts
// at a chunk boundary keeps its tensor's 16-byte alignment.
constexpr int64_t kChunk = 16384;

// NOTE: CUDA 12.1+ on sm_70+ allows 32 KiB of kernel arguments; this fills most of it (see the static_assert in
// nag_kernel.cu), so one launch covers up to 640 tensors where torch's fused SGD covers 336.
constexpr int kMaxSegments = 640;

// Blocks in one launch: gridDim.x allows 2^31 - 1; block_start is int32.
constexpr int64_t kMaxBlocks = 2147483647;

struct LaunchTable {
  void* param[kMaxSegments];
  void* grad[kMaxSegments];  // written only to unscale them for GradScaler
  void* buf[kMaxSegments];
  void* master[kMaxSegments];  // float32 master weights (master_weights=True), else unused
  int64_t numel[kMaxSegments];
  int32_t block_start[kMaxSegments + 1];  // segment s owns blocks [block_start[s], block_start[s + 1])
  uint8_t first[kMaxSegments];            // 1: the parameter's first step, its buffer is written, never read
  int32_t size;                           // segments in use
};

// A slice [offset, offset + numel) of tensor `tensor` of the group.
struct Segment {
  int64_t tensor;
  int64_t offset;
  int64_t numel;
};

inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Calls emit(segments, count, blocks) once per launch, in order. Empty tensors get no segment: they have nothing
// to update. `segs` is caller storage for max_segments entries, reused between launches.
template <typename Emit>
void plan_launches(const int64_t* numels, int64_t n, int64_t max_segments, int64_t max_blocks, Segment* segs,
                   Emit&& emit) {
  int64_t count = 0;
  int64_t blocks = 0;
  for (int64_t t = 0; t < n; ++t) {
    int64_t offset = 0;
    while (offset < numels[t]) {
      if (count == max_segments || blocks == max_blocks) {
        emit(segs, count, blocks);
        count = 0;
        blocks = 0;
      }
      const int64_t left = numels[t] - offset;
      const int64_t take_chunks = chunks_of(left) < max_blocks - blocks ? chunks_of(left) : max_blocks - blocks;
      const int64_t take = take_chunks * kChunk < left ? take_chunks * kChunk : left;
      segs[count++] = Segment{t, offset, take};
      blocks += take_chunks;
      offset += take;
    }
  }
  if (count > 0) emit(segs, count, blocks);  // always flush the last, partial launch
}

// block_start[s] = first block of segment s; block_start[count] = blocks in the launch.
inline void fill_block_start(const Segment* segs, int64_t count, int32_t* block_start) {
  int64_t b = 0;
  for (int64_t s = 0; s < count; ++s) {
    block_start[s] = static_cast<int32_t>(b);
    b += chunks_of(segs[s].numel);
  }
  block_start[count] = static_cast<int32_t>(b);
}

// The segment that owns `block`: the last s with block_start[s] <= block. Segments are never empty, so it is unique.
NAG_HOST_DEVICE int find_segment(const int32_t* block_start, int count, int64_t block) {
  int lo = 0;
  int hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (block_start[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// What `block` of a launch updates: elements [begin, end) of segment `segment`.
struct BlockWork {
  int segment;
  int64_t begin;
  int64_t end;
};

NAG_HOST_DEVICE BlockWork block_work(const int32_t* block_start, const int64_t* numel, int count, int64_t block) {
  const int s = find_segment(block_start, count, block);
  const int64_t begin = (block - block_start[s]) * kChunk;
  const int64_t end = begin + kChunk < numel[s] ? begin + kChunk : numel[s];
  return BlockWork{s, begin, end};
}

}  // namespace nag
