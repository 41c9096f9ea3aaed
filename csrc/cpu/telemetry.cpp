// CPU kernel of ffn_stats (telemetry.h).
//
// Rows are reduced in fixed row chunks (parallel.h), each with float64
// partials, so the result is bit-reproducible. Within a row the sums
// run in float32 vector lanes (float64 for float64 input) and each row's totals
// are added to the chunk's float64 partials.
//
//   pass over ffn_input: each row's mean over features.
//   pass 1 over preact:  h = act(gate) (* up) on the fly; sums of h^1..4, max|h|,
//                        gate pre-activation sums and saturation counts; the max
//                        |h| of every row is kept.
//   pass 2 over preact:  the count of |h| > outlier * rms(h), which needs rms(h),
//                        i.e. all of pass 1, first. Only rows whose max |h| is
//                        above the threshold are read again (outliers are rare).
#include "activation.h"
#include "parallel.h"
#include "telemetry.h"
#include "vec.h"

#include <cmath>
#include <vector>

namespace ffn {
namespace cpu {
namespace {

// max that returns NaN if either side is NaN (a diverged run must show up).
inline double nan_max(double a, double b) { return (std::isnan(a) || a > b) ? a : b; }

template <typename T>
void input_stats(const Tensor& x, double* out) {
  const int64_t rows = x.size(0), d = x.size(1);
  const T* X = x.const_data_ptr<T>();
  const int64_t chunks = row_chunks(rows);
  std::vector<double> mean_sum(chunks, 0.0), mean_abs_sum(chunks, 0.0);
  for_each_row_chunk(rows, d, chunks, [&](int64_t c, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = X + r * d;
      const double mean =
          static_cast<double>(sum_row<T>(d, [&](int64_t i, int64_t n) { return load<T>(xr + i, n); })) / d;
      mean_sum[c] += mean;
      mean_abs_sum[c] += std::abs(mean);
    }
  });
  out[kTokens] = static_cast<double>(rows);
  out[kInputRowMeanSum] = 0;
  out[kInputRowMeanAbsSum] = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    out[kInputRowMeanSum] += mean_sum[c];
    out[kInputRowMeanAbsSum] += mean_abs_sum[c];
  }
}

// One step of a row of preact: the gate pre-activation, act(gate) and h.
template <typename T>
struct HiddenStep {
  Pack<T> gate, act, h;
};

template <typename T, typename A, bool kGated>
inline HiddenStep<T> hidden_step(const T* zr, int64_t F, int64_t i, int64_t n) {
  const auto gate = load<T>(zr + i, n);
  const auto act = A::value(gate);
  if constexpr (kGated) {
    return {gate, act, act * load<T>(zr + F + i, n)};
  } else {
    return {gate, act, act};
  }
}

// Float64 partial sums of pass 1 over a chunk of rows.
struct HiddenPartial {
  double h_sum = 0, h_sq_sum = 0, h_cube_sum = 0, h_quad_sum = 0, h_abs_max = 0;
  double gate_sum = 0, gate_sq_sum = 0, gate_near_zero = 0, gate_large = 0;
};

template <typename T, typename A, bool kGated>
void hidden_stats(const Tensor& preact, const StatThresholds& thresholds, double* out) {
  using Acc = acc_t<T>;
  const int64_t rows = preact.size(0), cols = preact.size(1), F = kGated ? cols / 2 : cols;
  const T* Z = preact.const_data_ptr<T>();
  const Pack<T> near_zero(static_cast<Acc>(thresholds.near_zero));
  const Pack<T> large(static_cast<Acc>(thresholds.large));
  const int64_t chunks = row_chunks(rows);
  std::vector<HiddenPartial> partial(chunks);
  std::vector<Acc> row_abs_max(rows);

  // Pass 1.
  for_each_row_chunk(rows, cols, chunks, [&](int64_t c, int64_t begin, int64_t end) {
    HiddenPartial& p = partial[c];
    for (int64_t r = begin; r < end; ++r) {
      const T* zr = Z + r * cols;
      Pack<T> h1(0), h2(0), h3(0), h4(0), abs_max(0), g1(0), g2(0), near_count(0), large_count(0);
      for_each_step<T>(F, [&](int64_t i, int64_t n) {
        const auto [gate, act, h] = hidden_step<T, A, kGated>(zr, F, i, n);
        const auto h_sq = h * h;
        h1 = h1 + h;
        h2 = h2 + h_sq;
        h3 = fmadd(h_sq, h, h3);
        h4 = fmadd(h_sq, h_sq, h4);
        abs_max = maximum(abs_max, h.abs());
        if constexpr (kGated) {
          const auto act_abs = act.abs();
          g1 = g1 + gate;
          g2 = fmadd(gate, gate, g2);
          // Lanes past n hold act(0) = 0, which would count as near zero.
          near_count = near_count + valid_lanes<T>(act_abs.lt(near_zero), n);
          large_count = large_count + act_abs.gt(large);
        }
      });
      row_abs_max[r] = max_lanes<T>(abs_max);
      p.h_sum += sum_lanes<T>(h1);
      p.h_sq_sum += sum_lanes<T>(h2);
      p.h_cube_sum += sum_lanes<T>(h3);
      p.h_quad_sum += sum_lanes<T>(h4);
      p.h_abs_max = nan_max(p.h_abs_max, row_abs_max[r]);
      if constexpr (kGated) {
        p.gate_sum += sum_lanes<T>(g1);
        p.gate_sq_sum += sum_lanes<T>(g2);
        p.gate_near_zero += sum_lanes<T>(near_count);
        p.gate_large += sum_lanes<T>(large_count);
      }
    }
  });
  HiddenPartial total;
  for (const HiddenPartial& p : partial) {
    total.h_sum += p.h_sum;
    total.h_sq_sum += p.h_sq_sum;
    total.h_cube_sum += p.h_cube_sum;
    total.h_quad_sum += p.h_quad_sum;
    total.h_abs_max = nan_max(total.h_abs_max, p.h_abs_max);
    total.gate_sum += p.gate_sum;
    total.gate_sq_sum += p.gate_sq_sum;
    total.gate_near_zero += p.gate_near_zero;
    total.gate_large += p.gate_large;
  }
  const double h_count = static_cast<double>(rows) * static_cast<double>(F);
  out[kHCount] = h_count;
  out[kHSum] = total.h_sum;
  out[kHSqSum] = total.h_sq_sum;
  out[kHCubeSum] = total.h_cube_sum;
  out[kHQuadSum] = total.h_quad_sum;
  out[kHAbsMax] = total.h_abs_max;
  out[kGateCount] = kGated ? h_count : 0;
  out[kGateSum] = total.gate_sum;
  out[kGateSqSum] = total.gate_sq_sum;
  out[kGateNearZero] = total.gate_near_zero;
  out[kGateLarge] = total.gate_large;

  // Pass 2.
  out[kHOutliers] = 0;
  if (h_count == 0) return;
  const Acc threshold = static_cast<Acc>(thresholds.outlier * std::sqrt(total.h_sq_sum / h_count));
  const Pack<T> threshold_v(threshold);
  std::vector<double> outliers(chunks, 0.0);
  for_each_row_chunk(rows, cols, chunks, [&](int64_t c, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (!(row_abs_max[r] > threshold)) continue;
      const T* zr = Z + r * cols;
      Pack<T> count(0);
      for_each_step<T>(F, [&](int64_t i, int64_t n) {
        // Lanes past n hold h = 0, never above a threshold >= 0.
        count = count + hidden_step<T, A, kGated>(zr, F, i, n).h.abs().gt(threshold_v);
      });
      outliers[c] += sum_lanes<T>(count);
    }
  });
  for (const double count : outliers) out[kHOutliers] += count;
}

void ffn_stats_kernel(const Tensor& x, const Tensor& preact, Activation act, bool gated,
                      const StatThresholds& thresholds, const Tensor& stats) {
  double* out = stats.mutable_data_ptr<double>();
  dispatch_float_types(x.scalar_type(), "ffn_stats_input_cpu",
                       [&](auto tag) { input_stats<decltype(tag)>(x, out); });
  dispatch_float_types(preact.scalar_type(), "ffn_stats_hidden_cpu", [&](auto tag) {
    using scalar_t = decltype(tag);
    dispatch_activation<Act>(act, [&](auto a) {
      if (gated) {
        hidden_stats<scalar_t, decltype(a), true>(preact, thresholds, out);
      } else {
        hidden_stats<scalar_t, decltype(a), false>(preact, thresholds, out);
      }
    });
  });
}

}  // namespace

const TelemetryKernels kTelemetryKernels{&ffn_stats_kernel};

}  // namespace cpu
}  // namespace ffn
