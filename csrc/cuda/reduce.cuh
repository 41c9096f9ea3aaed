// Row reductions for the CUDA norm kernels: a row is summed by a group of
// `threads_per_row` consecutive threads, either part of a warp (a power of two
// <= 32: shuffles only) or whole warps (a multiple of 32: shuffles, then the
// warp totals through shared memory).
//
// Every thread of a group ends with the same bits, and the order of the
// additions depends only on the launch shape, so results are reproducible.
#pragma once

#include <c10/macros/Macros.h>

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

}  // namespace ffn::cuda
