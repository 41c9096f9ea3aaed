// CUDA kernel of ffn_stats (telemetry.h).
//
// One warp per row (rows spread over a grid whose size depends only on the row
// count), lanes striding over the row in 128-bit words. Each lane accumulates
// its share of a row in float32 (float64 for float64 input) and adds the row's
// totals to its float64 accumulators; each block reduces those
// (block_all_reduce, reduce.cuh) and writes one partial per field;
// reduce_partials_kernel then adds the blocks' partials in a fixed order. No
// atomics, so the result is bit-reproducible.
//
//   input_stats_kernel    ffn_input: each row's mean over features.
//   hidden_stats_kernel   the pass over preact: h = act(gate) (* up) on the fly;
//                         sums of h^1..4, max|h|, gate sums and saturation
//                         counts; the max |h| of every row is kept.
//   outlier_count_kernel  |h| > outlier * rms(h) needs rms(h), i.e. all of the
//                         pass, first; it reads rms from the reduced stats on
//                         the device (no host sync) and reads again only the
//                         rows whose max |h| is above the threshold (outliers
//                         are rare: usually none).
#include "activation.cuh"
#include "reduce.cuh"
#include "runtime.cuh"
#include "telemetry.h"
#include "vec.cuh"

#include <algorithm>
#include <cmath>

namespace ffn {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int64_t kMaxBlocks = 1024;

// Per-block partials: the stats fields [kTokens, kInputRowMeanAbsSum] from the
// input pass, [kHCount, kGateLarge] from pass 1, kHOutliers from pass 2.
constexpr int kInputFields = kInputRowMeanAbsSum - kTokens + 1;
constexpr int kHiddenFields = kGateLarge - kHCount + 1;
constexpr int kHiddenMaxField = kHAbsMax - kHCount;
static_assert(kHOutliers == kGateLarge + 1 && kNumStatFields == kHOutliers + 1,
              "the partials layout follows StatField");

int num_blocks(int64_t rows) {
  return static_cast<int>(std::clamp<int64_t>(ceil_div(rows, kWarps), 1, kMaxBlocks));
}

// Reduces each thread's values[k] over the block (a sum, or for k == max_field
// a NaN-propagating max) and thread 0 writes them to out[0..kFields).
template <int kFields>
__device__ void store_block_partials(const double (&values)[kFields], int max_field, double* out) {
  for (int k = 0; k < kFields; ++k) {
    const double total = k == max_field ? block_all_reduce<kThreads>(values[k], NanMax{})
                                        : block_all_reduce<kThreads>(values[k], Sum{});
    if (threadIdx.x == 0) out[k] = total;
  }
}

// Calls fn(offset, count) for each 128-bit word of a row of n elements of T
// that this lane owns (count: the word's valid elements, <= kVecWidth<T>).
template <typename T, typename Fn>
__device__ __forceinline__ void for_lane_words(int64_t n, int lane, const Fn& fn) {
  constexpr int V = kVecWidth<T>;
  for (int64_t col = int64_t{lane} * V; col < n; col += int64_t{kWarpSize} * V) {
    fn(col, std::min<int64_t>(n - col, V));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    input_stats_kernel(const T* __restrict__ x, int64_t rows, int64_t d, bool vectorized,
                       double* __restrict__ partials) {
  using Acc = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  double values[kInputFields] = {};  // tokens, sum of row means, sum of |row mean|
  // r is the same for all lanes of a warp: the warp reduction below is never divergent.
  for (int64_t r = int64_t(blockIdx.x) * kWarps + warp; r < rows; r += int64_t(gridDim.x) * kWarps) {
    const T* xr = x + r * d;
    Acc sum = 0;
    for_lane_words<T>(d, lane, [&](int64_t col, int64_t count) {
      Acc v[V];
      load<V>(xr + col, count, vectorized, v);  // zero past the end of the row
#pragma unroll
      for (int k = 0; k < V; ++k) sum += v[k];
    });
    sum = warp_all_reduce(sum, Sum{});
    if (lane == 0) {
      const double mean = static_cast<double>(sum) / static_cast<double>(d);
      values[0] += 1;
      values[1] += mean;
      values[2] += fabs(mean);
    }
  }
  store_block_partials<kInputFields>(values, /*max_field=*/-1, partials + blockIdx.x * kInputFields);
}

// A word of a row of preact: the gate pre-activations, act(gate) and h.
template <typename T>
struct HiddenWord {
  acc_t<T> gate[kVecWidth<T>], act[kVecWidth<T>], h[kVecWidth<T>];
};

template <typename A, typename T>
__device__ __forceinline__ HiddenWord<T> hidden_word(const T* zr, int64_t F, bool gated,
                                                    bool vectorized, int64_t col, int64_t count) {
  constexpr int V = kVecWidth<T>;
  HiddenWord<T> w;
  load<V>(zr + col, count, vectorized, w.gate);
#pragma unroll
  for (int k = 0; k < V; ++k) w.act[k] = w.h[k] = A::value(w.gate[k]);
  if (gated) {
    acc_t<T> up[V];
    load<V>(zr + F + col, count, vectorized, up);
#pragma unroll
    for (int k = 0; k < V; ++k) w.h[k] = w.act[k] * up[k];
  }
  return w;
}

// Three 128-bit words of h terms and a dozen accumulators per thread: built
// for 2 resident blocks (up to 128 registers) so that no instantiation spills.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads, 2)
    hidden_stats_kernel(const T* __restrict__ z, int64_t rows, int64_t F, bool gated,
                        bool vectorized, acc_t<T> near_zero, acc_t<T> large,
                        double* __restrict__ partials, acc_t<T>* __restrict__ row_abs_max) {
  using Acc = acc_t<T>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t cols = gated ? 2 * F : F;
  // StatField order from kHCount: h count, sums of h^1..4, max|h|, gate count,
  // gate sum, gate sum of squares, near-zero count, large count.
  double values[kHiddenFields] = {};
  for (int64_t r = int64_t(blockIdx.x) * kWarps + warp; r < rows; r += int64_t(gridDim.x) * kWarps) {
    const T* zr = z + r * cols;
    Acc h1 = 0, h2 = 0, h3 = 0, h4 = 0, abs_max = 0, g1 = 0, g2 = 0, near_count = 0, large_count = 0;
    for_lane_words<T>(F, lane, [&](int64_t col, int64_t count) {
      const HiddenWord<T> w = hidden_word<A>(zr, F, gated, vectorized, col, count);
#pragma unroll
      for (int k = 0; k < kVecWidth<T>; ++k) {  // constant bounds: w stays in registers
        if (k >= count) break;
        const Acc h_sq = w.h[k] * w.h[k];
        h1 += w.h[k];
        h2 += h_sq;
        h3 += h_sq * w.h[k];
        h4 += h_sq * h_sq;
        abs_max = NanMax{}(abs_max, Acc(fabs(w.h[k])));
        if (gated) {
          const Acc act_abs = fabs(w.act[k]);
          g1 += w.gate[k];
          g2 += w.gate[k] * w.gate[k];
          near_count += act_abs < near_zero ? Acc(1) : Acc(0);
          large_count += act_abs > large ? Acc(1) : Acc(0);
        }
      }
    });
    const Acc row_max = warp_all_reduce(abs_max, NanMax{});
    if (lane == 0) {
      row_abs_max[r] = row_max;
      values[0] += static_cast<double>(F);
      values[6] += gated ? static_cast<double>(F) : 0.0;
    }
    values[1] += h1;
    values[2] += h2;
    values[3] += h3;
    values[4] += h4;
    values[5] = NanMax{}(values[5], static_cast<double>(abs_max));
    values[7] += g1;
    values[8] += g2;
    values[9] += near_count;
    values[10] += large_count;
  }
  store_block_partials<kHiddenFields>(values, kHiddenMaxField,
                                      partials + blockIdx.x * kHiddenFields);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    outlier_count_kernel(const T* __restrict__ z, int64_t rows, int64_t F, bool gated,
                         bool vectorized, double outlier, const acc_t<T>* __restrict__ row_abs_max,
                         const double* __restrict__ stats, double* __restrict__ partials) {
  using Acc = acc_t<T>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t cols = gated ? 2 * F : F;
  // NaN when h is empty or has a NaN: then no element counts.
  const Acc threshold = static_cast<Acc>(outlier * sqrt(stats[kHSqSum] / stats[kHCount]));
  double values[1] = {};
  for (int64_t r = int64_t(blockIdx.x) * kWarps + warp; r < rows; r += int64_t(gridDim.x) * kWarps) {
    if (!(row_abs_max[r] > threshold)) continue;  // no outlier in this row
    const T* zr = z + r * cols;
    Acc count_above = 0;
    for_lane_words<T>(F, lane, [&](int64_t col, int64_t count) {
      const HiddenWord<T> w = hidden_word<A>(zr, F, gated, vectorized, col, count);
#pragma unroll
      for (int k = 0; k < kVecWidth<T>; ++k) {
        if (k < count) count_above += fabs(w.h[k]) > threshold ? Acc(1) : Acc(0);
      }
    });
    values[0] += count_above;
  }
  store_block_partials<1>(values, /*max_field=*/-1, partials + blockIdx.x);
}

// out[k] = sum over blocks of partials[b][k] (for k == max_field: the
// NaN-propagating max), blocks taken in a fixed order. One block per field.
__global__ void __launch_bounds__(kThreads)
    reduce_partials_kernel(const double* __restrict__ partials, int blocks, int fields,
                           int max_field, double* __restrict__ out) {
  const int k = blockIdx.x;
  const bool is_max = k == max_field;
  double value = 0;
  for (int b = threadIdx.x; b < blocks; b += kThreads) {
    const double p = partials[int64_t(b) * fields + k];
    value = is_max ? NanMax{}(value, p) : value + p;
  }
  const double total = is_max ? block_all_reduce<kThreads>(value, NanMax{})
                              : block_all_reduce<kThreads>(value, Sum{});
  if (threadIdx.x == 0) out[k] = total;
}

void reduce_partials(const Tensor& partials, int max_field, double* out) {
  const int blocks = static_cast<int>(partials.size(0)), fields = static_cast<int>(partials.size(1));
  launch(reduce_partials_kernel, {static_cast<unsigned>(fields), kThreads},
         partials.const_data_ptr<double>(), blocks, fields, max_field, out);
}

// Whether rows of n elements of T at p can be read in 128-bit words.
template <typename T>
bool rows_vectorized(const T* p, int64_t n) {
  return n % kVecWidth<T> == 0 && all_aligned16({p});
}

void ffn_stats_kernel(const Tensor& x, const Tensor& preact, Activation act, bool gated,
                      const StatThresholds& thresholds, const Tensor& stats) {
  const DeviceGuard device_guard(preact.get_device_index());
  double* out = stats.mutable_data_ptr<double>();
  const int64_t rows = x.size(0), d = x.size(1);
  const int blocks = num_blocks(rows);
  const dim3 grid(static_cast<unsigned>(blocks));

  const Tensor input_partials = ffn::empty({blocks, kInputFields}, stats);
  dispatch_float_types(x.scalar_type(), "ffn_stats_input_cuda", [&](auto t) {
    using scalar_t = decltype(t);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    launch(input_stats_kernel<scalar_t>, {grid, kThreads}, xp, rows, d, rows_vectorized(xp, d),
           input_partials.mutable_data_ptr<double>());
  });
  reduce_partials(input_partials, /*max_field=*/-1, out + kTokens);

  const int64_t F = gated ? preact.size(1) / 2 : preact.size(1);
  const Tensor hidden_partials = ffn::empty({blocks, kHiddenFields}, stats);
  const Tensor outlier_partials = ffn::empty({blocks, 1}, stats);
  dispatch_float_types(preact.scalar_type(), "ffn_stats_hidden_cuda", [&](auto t) {
    using scalar_t = decltype(t);
    using Acc = acc_t<scalar_t>;
    const Tensor row_abs_max = ffn::empty({rows}, scalar_type_of<Acc>(), preact);
    const scalar_t* z = preact.const_data_ptr<scalar_t>();
    // The up half starts F elements into each row: F words must align too.
    const bool vectorized = rows_vectorized(z, preact.size(1)) && F % kVecWidth<scalar_t> == 0;
    dispatch_activation<Act>(act, [&](auto fn) {
      using A = decltype(fn);
      launch(hidden_stats_kernel<scalar_t, A>, {grid, kThreads}, z, rows, F, gated, vectorized,
             static_cast<Acc>(thresholds.near_zero), static_cast<Acc>(thresholds.large),
             hidden_partials.mutable_data_ptr<double>(), row_abs_max.mutable_data_ptr<Acc>());
      reduce_partials(hidden_partials, kHiddenMaxField, out + kHCount);
      launch(outlier_count_kernel<scalar_t, A>, {grid, kThreads}, z, rows, F, gated, vectorized,
             thresholds.outlier, row_abs_max.const_data_ptr<Acc>(), out,
             outlier_partials.mutable_data_ptr<double>());
      reduce_partials(outlier_partials, /*max_field=*/-1, out + kHOutliers);
    });
  });
}

}  // namespace

const TelemetryKernels kTelemetryKernels{&ffn_stats_kernel};

}  // namespace cuda
}  // namespace ffn
