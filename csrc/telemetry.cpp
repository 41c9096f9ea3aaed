// ffn_stats op body: argument checks, layout and allocation. The kernels live in
// cpu/telemetry.cpp and cuda/telemetry.cu.
#include "telemetry.h"

#include "common.h"


#include <cmath>

namespace ffn {

namespace {

void check_threshold(const char* name, double value) {
  FFN_CHECK(std::isfinite(value) && value >= 0, "ffn.ffn_stats: ", name,
            " must be a finite number >= 0, got ", value);
}

}  // namespace

Tensor ffn_stats_body(const Tensor& ffn_input, const Tensor& preact, std::string_view activation,
                      bool gated, double near_zero, double large, double outlier,
                      const TelemetryKernels& kernels) {
  constexpr std::string_view op = "ffn_stats";
  check_input(op, "ffn_input", ffn_input);
  check_input(op, "preact", preact);
  check_same_device(op, "preact", preact, ffn_input);
  const Activation act = parse_gated_activation(op, activation);
  FFN_CHECK(ffn_input.size(-1) > 0, "ffn.ffn_stats: ffn_input must have at least one feature "
            "(its last dim), got shape ", shape_str(ffn_input.sizes()));
  const int64_t rows = leading_rows(ffn_input);
  FFN_CHECK(preact.dim() == 2 && preact.size(0) == rows, "ffn.ffn_stats: preact must be a 2-D [",
            rows, ", ", gated ? "2*d_ff" : "d_ff",
            "] tensor (one row per token of ffn_input, as _gelu_ffn_fwd / _gated_ffn_fwd "
            "return it), got shape ", shape_str(preact.sizes()));
  FFN_CHECK(!gated || preact.size(1) % 2 == 0, "ffn.ffn_stats: a gated preact must have an "
            "even number of columns ([rows, 2*d_ff]: gate columns, then up), got ",
            preact.size(1));
  check_threshold("near_zero", near_zero);
  check_threshold("large", large);
  check_threshold("outlier", outlier);

  Tensor stats = empty({kNumStatFields}, kDouble, preact);
  kernels.ffn_stats(as_rows(ffn_input), as_contiguous(preact), act, gated,
                    StatThresholds{near_zero, large, outlier}, stats);
  return stats;
}

}  // namespace ffn
