// ffn_stats: per-layer FFN telemetry as one op.
//
// The op returns raw float64 sums, counts and one running max over the tokens of
// one call, so micro-batches and DDP ranks combine by adding (and taking the max)
// before anything is divided; ops/telemetry.py names the entries (STAT_FIELDS,
// same order as StatField) and turns them into means, shares and moments.
//
// h, the hidden activation entering the down projection, is recomputed from the
// pre-activation inside the kernels (never materialized), in the accumulation
// type (float32, float64 for float64 input) without rounding to the input dtype.
#pragma once

#include "activation_table.h"
#include "tensor.h"

#include <string_view>

namespace ffn {

// Entries of the stats vector, in order. Sums are over all tokens (rows) of the call.
enum StatField : int64_t {
  kTokens,               // rows of ffn_input
  kInputRowMeanSum,      // sum over rows of mean over features of ffn_input
  kInputRowMeanAbsSum,   // sum over rows of |mean over features of ffn_input|
  kHCount,               // elements of h (rows * F)
  kHSum,                 // sum of h
  kHSqSum,               // sum of h^2
  kHCubeSum,             // sum of h^3
  kHQuadSum,             // sum of h^4
  kHAbsMax,              // max |h| (the only max entry; NaN if h has a NaN)
  kGateCount,            // gate elements (rows * F when gated, else 0)
  kGateSum,              // sum of gate pre-activations
  kGateSqSum,            // sum of squared gate pre-activations
  kGateNearZero,         // count of |act(gate)| < near_zero
  kGateLarge,            // count of |act(gate)| > large
  kHOutliers,            // count of |h| > outlier * rms(h), rms of this call's h
  kNumStatFields
};

struct StatThresholds {
  double near_zero;
  double large;
  double outlier;
};

// One backend's kernel. x: [rows, d] contiguous; preact: [rows, F] or, when
// gated, [rows, 2F] (gate columns, then up), contiguous; any supported float
// dtypes, not necessarily the same. Writes all kNumStatFields entries of stats
// (float64, on the inputs' device).
struct TelemetryKernels {
  void (*ffn_stats)(const Tensor& x, const Tensor& preact, Activation act, bool gated,
                    const StatThresholds& thresholds, const Tensor& stats);
};

// The op body (telemetry.cpp): checks, layout, allocation; then the backend's kernel.
Tensor ffn_stats_body(const Tensor& ffn_input, const Tensor& preact, std::string_view activation,
                      bool gated, double near_zero, double large, double outlier,
                      const TelemetryKernels& kernels);

// Kernel tables of each backend.
namespace cpu {
extern const TelemetryKernels kTelemetryKernels;
}  // namespace cpu
namespace cuda {
extern const TelemetryKernels kTelemetryKernels;
}  // namespace cuda

// The op, as its schema declares it.
template <const TelemetryKernels& K>
Tensor ffn_stats(const Tensor& ffn_input, const Tensor& preact, std::string_view activation,
                 bool gated, double near_zero, double large, double outlier) {
  return ffn_stats_body(ffn_input, preact, activation, gated, near_zero, large, outlier, K);
}

}  // namespace ffn
