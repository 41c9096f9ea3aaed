// Reductions of the CUDA kernels. The order of the operations depends only on
// the launch shape, so results are reproducible.
//
// Norm rows (group_sum, row_sum): a row is summed by a group of
// `threads_per_row` consecutive threads, either part of a warp (a power of two
// <= 32: shuffles only) or whole warps (a multiple of 32: shuffles, then the
// warp totals through shared memory); every thread of a group ends with the
// same bits.
//
// Telemetry (warp_all_reduce, block_all_reduce): one value per thread over a
// warp or a whole block, every thread ending with the same result.
#pragma once

#include "runtime.cuh"

namespace ffn::cuda {

constexpr int kWarpSize = 32;
constexpr int kMaxBlockThreads = 1024;
constexpr int kMaxWarps = kMaxBlockThreads / kWarpSize;

// Sums v[0..N) over aligned groups of `width` lanes (a power of two <= 32).
// Butterfly: both lanes of a pair add the same two partial sums (a + b == b + a),
// so all lanes of a group hold identical totals.
template <int N, typename A>
__device__ __forceinline__ void group_sum(A (&v)[N], int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
  }
}

// Sums v[0..N) over each group of `threads_per_row` consecutive threads of the
// block. Every thread of the block must call it (it may synchronize the block).
// scratch: N * kMaxWarps values of shared memory.
template <int N, typename A>
__device__ __forceinline__ void row_sum(A (&v)[N], int threads_per_row, A* scratch) {
  if (threads_per_row <= kWarpSize) {
    group_sum<N>(v, threads_per_row);
    return;
  }
  group_sum<N>(v, kWarpSize);
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) scratch[k * kMaxWarps + warp] = v[k];
  }
  __syncthreads();
  const int warps = threads_per_row / kWarpSize;
  const int first = (static_cast<int>(threadIdx.x) / threads_per_row) * warps;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    A total = 0;
    for (int w = 0; w < warps; ++w) total += scratch[k * kMaxWarps + first + w];
    v[k] = total;
  }
  __syncthreads();  // scratch is free for the next call
}

// The operations of warp_all_reduce / block_all_reduce.
struct Sum {
  template <typename V>
  __device__ V operator()(const V& a, const V& b) const {
    return a + b;
  }
};
// max that returns NaN if either side is NaN (a diverged run must show up).
struct NanMax {
  template <typename V>
  __device__ V operator()(const V& a, const V& b) const {
    return (a != a || a > b) ? a : b;
  }
};

// v reduced with op over the (full) warp; every lane ends with the result
// (a butterfly, so every lane adds the same values in the same order).
template <typename V, typename Op>
__device__ __forceinline__ V warp_all_reduce(V v, Op op) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// v reduced with op over a 1-D block of kThreads threads (a multiple of 32);
// every thread ends with the result. Every thread must call it.
template <int kThreads, typename V, typename Op>
__device__ __forceinline__ V block_all_reduce(V v, Op op) {
  static_assert(kThreads % kWarpSize == 0 && kThreads <= kMaxBlockThreads, "whole warps");
  constexpr int kWarps = kThreads / kWarpSize;
  FFN_SHARED(warp_totals, V[kWarps]);
  v = warp_all_reduce(v, op);
  if (threadIdx.x % kWarpSize == 0) warp_totals[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  V total = warp_totals[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total = op(total, warp_totals[w]);
  __syncthreads();  // warp_totals is free for the next call
  return total;
}

}  // namespace ffn::cuda
