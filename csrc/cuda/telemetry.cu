// CUDA kernel of ffn_stats (telemetry.h).
//
// One warp per row (rows spread over a grid whose size depends only on the row
// count), lanes striding over the features. Each lane accumulates its share of
// a row in float32 (float64 for float64 input) and adds the row's totals to its
// float64 accumulators; each block reduces those (block_reduce, reduce.cuh) and
// writes one partial per field; reduce_partials_kernel then adds the blocks'
// partials in a fixed order. No atomics, so the result is bit-reproducible.
//
//   input_stats_kernel    ffn_input: each row's mean over features.
//   hidden_stats_kernel   pass 1 over preact: h = act(gate) (* up) on the fly;
//                         sums of h^1..4, max|h|, gate sums and saturation
//                         counts; the max |h| of every row is kept.
//   outlier_count_kernel  pass 2: |h| > outlier * rms(h) needs rms(h), i.e. all
//                         of pass 1, first; it reads rms from the reduced stats
//                         on the device (no host sync) and reads again only the
//                         rows whose max |h| is above the threshold.
#include "activation.cuh"
#include "reduce.cuh"
#include "telemetry.h"
#include "vec.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

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
  __shared__ BlockReduceStorage<double, kThreads> storage;
  for (int k = 0; k < kFields; ++k) {
    const double total = k == max_field ? block_reduce<kThreads>(values[k], NanMax{}, storage)
                                        : block_reduce<kThreads>(values[k], Sum{}, storage);
    if (threadIdx.x == 0) out[k] = total;
    __syncthreads();  // the next field reuses storage
  }
}

template <typename T>
__global__ void input_stats_kernel(const T* __restrict__ x, int64_t rows, int64_t d,
                                   double* __restrict__ partials) {
  using Acc = acc_t<T>;
  __shared__ WarpReduceStorage<Acc> warp_storage[kWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  double values[kInputFields] = {};  // tokens, sum of row means, sum of |row mean|
  // r is the same for all lanes of a warp: the warp reduction below is never divergent.
  for (int64_t r = int64_t(blockIdx.x) * kWarps + warp; r < rows; r += int64_t(gridDim.x) * kWarps) {
    const T* xr = x + r * d;
    Acc sum = 0;
#pragma unroll 4
    for (int64_t i = lane; i < d; i += kWarpSize) sum += static_cast<Acc>(xr[i]);
    sum = warp_reduce(sum, Sum{}, warp_storage[warp]);  // valid in lane 0
    __syncwarp();
    if (lane == 0) {
      const double mean = static_cast<double>(sum) / static_cast<double>(d);
      values[0] += 1;
      values[1] += mean;
      values[2] += fabs(mean);
    }
  }
  store_block_partials<kInputFields>(values, /*max_field=*/-1, partials + blockIdx.x * kInputFields);
}

// One element of a row of preact: the gate pre-activation, act(gate) and h.
template <typename Acc>
struct HiddenElement {
  Acc gate, act, h;
};

template <typename A, typename T, typename Acc = acc_t<T>>
__device__ inline HiddenElement<Acc> hidden_at(const T* zr, int64_t F, bool gated, int64_t i) {
  const Acc gate = static_cast<Acc>(zr[i]);
  const Acc act = A::template value<Acc>(gate);
  return {gate, act, gated ? act * static_cast<Acc>(zr[F + i]) : act};
}

template <typename T, typename A>
__global__ void hidden_stats_kernel(const T* __restrict__ z, int64_t rows, int64_t F, bool gated,
                                    acc_t<T> near_zero, acc_t<T> large,
                                    double* __restrict__ partials,
                                    acc_t<T>* __restrict__ row_abs_max) {
  using Acc = acc_t<T>;
  __shared__ WarpReduceStorage<Acc> warp_storage[kWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t cols = gated ? 2 * F : F;
  // StatField order from kHCount: h count, sums of h^1..4, max|h|, gate count,
  // gate sum, gate sum of squares, near-zero count, large count.
  double values[kHiddenFields] = {};
  for (int64_t r = int64_t(blockIdx.x) * kWarps + warp; r < rows; r += int64_t(gridDim.x) * kWarps) {
    const T* zr = z + r * cols;
    Acc h1 = 0, h2 = 0, h3 = 0, h4 = 0, abs_max = 0, g1 = 0, g2 = 0, near_count = 0, large_count = 0;
#pragma unroll 4
    for (int64_t i = lane; i < F; i += kWarpSize) {
      const HiddenElement<Acc> e = hidden_at<A>(zr, F, gated, i);
      const Acc h_sq = e.h * e.h;
      h1 += e.h;
      h2 += h_sq;
      h3 += h_sq * e.h;
      h4 += h_sq * h_sq;
      abs_max = NanMax{}(abs_max, Acc(fabs(e.h)));
      if (gated) {
        const Acc act_abs = fabs(e.act);
        g1 += e.gate;
        g2 += e.gate * e.gate;
        near_count += act_abs < near_zero ? Acc(1) : Acc(0);
        large_count += act_abs > large ? Acc(1) : Acc(0);
      }
    }
    const Acc row_max = warp_reduce(abs_max, NanMax{}, warp_storage[warp]);  // lane 0
    __syncwarp();
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
__global__ void outlier_count_kernel(const T* __restrict__ z, int64_t rows, int64_t F, bool gated,
                                     double outlier, const acc_t<T>* __restrict__ row_abs_max,
                                     const double* __restrict__ stats,
                                     double* __restrict__ partials) {
  using Acc = acc_t<T>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t cols = gated ? 2 * F : F;
  // NaN when h is empty or has a NaN: then no element counts.
  const Acc threshold = static_cast<Acc>(outlier * sqrt(stats[kHSqSum] / stats[kHCount]));
  double values[1] = {};
  for (int64_t r = int64_t(blockIdx.x) * kWarps + warp; r < rows; r += int64_t(gridDim.x) * kWarps) {
    if (!(row_abs_max[r] > threshold)) continue;  // no outlier in this row
    const T* zr = z + r * cols;
    Acc count = 0;
#pragma unroll 4
    for (int64_t i = lane; i < F; i += kWarpSize) {
      count += fabs(hidden_at<A>(zr, F, gated, i).h) > threshold ? Acc(1) : Acc(0);
    }
    values[0] += count;
  }
  store_block_partials<1>(values, /*max_field=*/-1, partials + blockIdx.x);
}

// out[k] = sum over blocks of partials[b][k] (for k == max_field: the
// NaN-propagating max), blocks taken in a fixed order. One block per field.
__global__ void reduce_partials_kernel(const double* __restrict__ partials, int blocks, int fields,
                                       int max_field, double* __restrict__ out) {
  const int k = blockIdx.x;
  const bool is_max = k == max_field;
  double value = 0;
  for (int b = threadIdx.x; b < blocks; b += kThreads) {
    const double p = partials[int64_t(b) * fields + k];
    value = is_max ? NanMax{}(value, p) : value + p;
  }
  __shared__ BlockReduceStorage<double, kThreads> storage;
  const double total = is_max ? block_reduce<kThreads>(value, NanMax{}, storage)
                              : block_reduce<kThreads>(value, Sum{}, storage);
  if (threadIdx.x == 0) out[k] = total;
}

void reduce_partials(const Tensor& partials, int max_field, double* out, cudaStream_t stream) {
  const int blocks = static_cast<int>(partials.size(0)), fields = static_cast<int>(partials.size(1));
  reduce_partials_kernel<<<fields, kThreads, 0, stream>>>(partials.const_data_ptr<double>(), blocks,
                                                          fields, max_field, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void ffn_stats_kernel(const Tensor& x, const Tensor& preact, Activation act, bool gated,
                      const StatThresholds& thresholds, const Tensor& stats) {
  const c10::cuda::CUDAGuard device_guard(preact.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  double* out = stats.mutable_data_ptr<double>();
  const int64_t rows = x.size(0), d = x.size(1);
  const int blocks = num_blocks(rows);

  const Tensor input_partials = at::empty({blocks, kInputFields}, stats.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ffn_stats_input_cuda",
                                  [&] {
    input_stats_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), rows, d, input_partials.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  reduce_partials(input_partials, /*max_field=*/-1, out + kTokens, stream);

  const int64_t F = gated ? preact.size(1) / 2 : preact.size(1);
  const Tensor hidden_partials = at::empty({blocks, kHiddenFields}, stats.options());
  const Tensor outlier_partials = at::empty({blocks, 1}, stats.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, preact.scalar_type(),
                                  "ffn_stats_hidden_cuda", [&] {
    using Acc = acc_t<scalar_t>;
    const Tensor row_abs_max =
        at::empty({rows}, preact.options().dtype(c10::CppTypeToScalarType<Acc>::value));
    dispatch_activation<Act>(act, [&](auto fn) {
      using A = decltype(fn);
      hidden_stats_kernel<scalar_t, A><<<blocks, kThreads, 0, stream>>>(
          preact.const_data_ptr<scalar_t>(), rows, F, gated, static_cast<Acc>(thresholds.near_zero),
          static_cast<Acc>(thresholds.large), hidden_partials.mutable_data_ptr<double>(),
          row_abs_max.mutable_data_ptr<Acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      reduce_partials(hidden_partials, kHiddenMaxField, out + kHCount, stream);
      outlier_count_kernel<scalar_t, A><<<blocks, kThreads, 0, stream>>>(
          preact.const_data_ptr<scalar_t>(), rows, F, gated, thresholds.outlier,
          row_abs_max.const_data_ptr<Acc>(), out, outlier_partials.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      reduce_partials(outlier_partials, /*max_field=*/-1, out + kHOutliers, stream);
    });
  });
}

}  // namespace

const TelemetryKernels kTelemetryKernels{&ffn_stats_kernel};

}  // namespace cuda
}  // namespace ffn
