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

// Row chunks of a parameter gradient's reduction over [rows, cols] (a norm's weight and bias,
// an FFN's bias): few when there is little work, so that zeroing and reducing the partial sums
// stays small next to the rows themselves.
inline int64_t param_grad_chunks(int64_t rows, int64_t cols) {
  return row_chunks(std::min(rows * std::max<int64_t>(cols, 1) / kGrainElements, rows));
}

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

// out[i] = sum over c of partial[c * stride + i] (stride d unless given), chunks added in order
// (vectorized along i: for_each_step over A is one register per step, and its whole steps have a
// constant count, so their loads and stores compile to single moves rather than memcpy calls).
template <typename A, typename P>
void sum_chunk_columns(const A* partial, int64_t chunks, int64_t d, P* out, int64_t stride = -1) {
  if (stride < 0) stride = d;
  for_each_step<A>(d, [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
    Lanes<A> sum = load_lanes(partial + i, n);
    for (int64_t c = 1; c < chunks; ++c) sum = sum + load_lanes(partial + c * stride + i, n);
    if constexpr (std::is_same_v<P, A>) {
      store_lanes(out + i, sum, n);
    } else {
      for (int64_t k = 0; k < n; ++k) out[i + k] = static_cast<P>(sum[k]);
    }
  });
}

// Column sums over one chunk's rows, added as a cascade: rows go into a block sum that is folded
// into a second level every kBlockRows rows, and that one into a third every kBlockRows blocks.
// One running sum per column over a chunk of a thousand rows was 4x less accurate than ATen's
// cascade sum (the FFN bias gradients); this stays as accurate.
template <typename A>
class ColumnCascade {
 public:
  static constexpr int64_t kLevels = 3;
  static constexpr int64_t kBlockRows = 16;

  // levels: kLevels * cols values of scratch, zeroed here.
  ColumnCascade(A* levels, int64_t cols) : levels_(levels), cols_(cols) {
    std::fill_n(levels_, kLevels * cols_, A(0));
  }
  // Where the current row's values are added.
  A* block_sums() const { return levels_; }
  // After each row.
  void row_done() {
    if (++rows_ % kBlockRows != 0) return;
    fold(0);
    if (rows_ % (kBlockRows * kBlockRows) == 0) fold(1);
  }
  // After the chunk's last row: its column sums are then the last level's cols values,
  // levels + (kLevels - 1) * cols.
  void finish() {
    fold(0);
    fold(1);
  }

 private:
  // Level `from` added into the next one, and zeroed.
  void fold(int64_t from) {
    A* src = levels_ + from * cols_;
    A* dst = src + cols_;
    for_each_step<A>(cols_, [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      store_lanes(dst + i, load_lanes(dst + i, n) + load_lanes(src + i, n), n);
      store_lanes(src + i, Lanes<A>{}, n);
    });
  }

  A* levels_;
  int64_t cols_;
  int64_t rows_ = 0;
};

}  // namespace ffn::cpu
