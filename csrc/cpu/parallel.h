// Work splitting of the CPU kernels, and their one deterministic reduction.
//
// Reductions over rows (norm weight/bias gradients, ffn_stats) split the rows
// into a fixed number of chunks, a function of the shape only (never of the
// thread count); each chunk accumulates its own partial sums and the partials
// are added in chunk order, so results are bit-reproducible on any machine.
#pragma once

#include "vec.h"

#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace ffn::cpu {

// Elements per parallel task: about this many, so small rows still split well.
constexpr int64_t kGrainElements = 32768;
// Most row chunks of a reduction.
constexpr int64_t kMaxRowChunks = 64;

// Rows per parallel task for rows of `cols` elements.
inline int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1));
}

// The chunk count for `wanted` chunks: between 1 and kMaxRowChunks.
inline int64_t row_chunks(int64_t wanted) { return std::clamp<int64_t>(wanted, 1, kMaxRowChunks); }

// Calls body(chunk, begin_row, end_row) for each of `chunks` row chunks of
// [rows, cols], in parallel. The caller adds the chunks' partials in order.
template <typename Body>
void for_each_row_chunk(int64_t rows, int64_t cols, int64_t chunks, const Body& body) {
  const int64_t elements_per_chunk = std::max<int64_t>(1, rows * cols / chunks);
  torch::stable::parallel_for(0, chunks, std::max<int64_t>(1, kGrainElements / elements_per_chunk),
                               [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) body(c, c * rows / chunks, (c + 1) * rows / chunks);
  });
}

// out[i] = sum over c of partial[c * d + i], chunks added in order (vectorized along i).
template <typename A, typename P>
void sum_chunk_columns(const A* partial, int64_t chunks, int64_t d, P* out) {
  for (int64_t i = 0; i < d; i += kLanes<A>) {
    const int64_t n = std::min<int64_t>(kLanes<A>, d - i);
    Lanes<A> sum = load_lanes(partial + i, n);
    for (int64_t c = 1; c < chunks; ++c) sum = sum + load_lanes(partial + c * d + i, n);
    if constexpr (std::is_same_v<P, A>) {
      store_lanes(out + i, sum, n);
    } else {
      for (int64_t k = 0; k < n; ++k) out[i + k] = static_cast<P>(sum[k]);
    }
  }
}

}  // namespace ffn::cpu
