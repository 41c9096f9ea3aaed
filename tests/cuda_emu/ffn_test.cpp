// The CUDA activation kernels (csrc/cuda/ffn.cu) and telemetry kernels
// (csrc/cuda/telemetry.cu), emulated, against the CPU kernels: every
// activation, gated and plain, forward and backward (with and without the
// recomputed hidden activation), widths with word tails and the launchers' 2-D
// grid boundaries, every dtype, misaligned inputs; the FFN op bodies end to end.
#include "emu_testing.h"

#include "telemetry.h"

namespace ffn::testing {
namespace {

const std::vector<at::ScalarType> kDtypes = {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble};
const std::vector<const char*> kGated = {"silu", "gelu", "gelu_tanh", "relu"};

// [rows, F]: 1 word, a tail word, 2 threads along a row, a full 256-thread row
// of words with a tail, and more words than a block (the grid's x stride).
const std::vector<std::pair<int64_t, int64_t>> kShapes = {
    {3, 1}, {5, 13}, {130, 16}, {2, 2053}, {1, 8 * 256 * 2 + 5}, {0, 8}};

TEST_F(SeededTest, EmulatedGatedActivationMatchesCpu) {
  for (const auto dtype : kDtypes) {
    for (const auto& [rows, F] : kShapes) {
      for (const char* act : kGated) {
        for (const bool misaligned : {false, true}) {
          SCOPED_TRACE(describe(dtype, "rows", rows, "F", F, act, misaligned ? "misaligned" : ""));
          Tensor gate_up = (at::randn({rows, 2 * F}, at::kDouble) * 2).to(dtype);
          Tensor grad = at::randn({rows, F}, at::kDouble).to(dtype);
          if (misaligned) {
            gate_up = misaligned_copy(gate_up);
            grad = misaligned_copy(grad);
          }
          EXPECT_TRUE(
              matches(call_body(gated_activation_forward, gate_up, act, cuda::kActivationKernels),
                      call_body(gated_activation_forward, gate_up, act, cpu::kActivationKernels), dtype))
              << "forward";
          EXPECT_TRUE(
              matches(call_body(gated_activation_backward, grad, gate_up, act, cuda::kActivationKernels),
                      call_body(gated_activation_backward, grad, gate_up, act, cpu::kActivationKernels),
                      dtype))
              << "backward";
        }
      }
    }
  }
}

TEST_F(SeededTest, EmulatedBiasGeluMatchesCpu) {
  for (const auto dtype : kDtypes) {
    for (const auto& [rows, F] : kShapes) {
      for (const char* approximate : {"none", "tanh"}) {
        for (const bool with_bias : {true, false}) {
          SCOPED_TRACE(describe(dtype, "rows", rows, "F", F, approximate, "bias", with_bias));
          const Tensor x = (at::randn({rows, F}, at::kDouble) * 2).to(dtype);
          const Tensor bias = with_bias ? at::randn({F}, at::kDouble).to(dtype) : Tensor();
          const Tensor grad = at::randn({rows, F}, at::kDouble).to(dtype);
          EXPECT_TRUE(matches(
              call_body(bias_gelu_forward, x, opt(bias), approximate, cuda::kActivationKernels),
              call_body(bias_gelu_forward, x, opt(bias), approximate, cpu::kActivationKernels),
              dtype))
              << "forward";
          const auto [gx, gb] =
              call_body(bias_gelu_backward, grad, x, opt(bias), approximate, with_bias,
                        cuda::kActivationKernels);
          const auto [gx_ref, gb_ref] =
              call_body(bias_gelu_backward, grad, x, opt(bias), approximate, with_bias,
                        cpu::kActivationKernels);
          EXPECT_TRUE(matches(gx, gx_ref, dtype)) << "grad_x";
          EXPECT_TRUE(matches(gb, gb_ref, dtype)) << "grad_bias";
        }
      }
    }
  }
}

// The FFN op bodies with the emulated activation kernels: forward, and backward
// with the recomputed hidden activation (the down projection's weight gradient).
TEST_F(SeededTest, EmulatedFfnOpsMatchCpu) {
  const std::array<bool, 5> all_grads = {true, true, true, true, true};
  for (const auto dtype : {at::kFloat, at::kBFloat16}) {
    for (const bool gated : {false, true}) {
      SCOPED_TRACE(describe(dtype, gated ? "swiglu" : "gelu_ffn"));
      const int64_t d = 24, F = 40, rows = 9;
      const Tensor x = at::randn({rows, d}, at::kDouble).to(dtype);
      const Tensor w_in = (at::randn({gated ? 2 * F : F, d}, at::kDouble) * 0.2).to(dtype);
      const Tensor b_in = at::randn({gated ? 2 * F : F}, at::kDouble).to(dtype);
      const Tensor w_out = (at::randn({d, F}, at::kDouble) * 0.2).to(dtype);
      const Tensor b_out = at::randn({d}, at::kDouble).to(dtype);
      const Tensor g = at::randn({rows, d}, at::kDouble).to(dtype);
      // What the op templates gated_ffn_fwd<K> ("silu") and gelu_ffn_fwd<K> ("none")
      // run, with the table as an argument.
      const Activation act = gated ? Activation::kSilu : Activation::kGelu;
      const auto forward = [&](const ActivationKernels& kernels, bool keep_preact = true) {
        return call_body(ffn_forward, gated ? "swiglu" : "gelu_ffn", x, w_in, b_in, w_out, b_out,
                         act, gated, kernels, keep_preact);
      };
      const auto backward = [&](const Tensor& preact, const ActivationKernels& kernels) {
        return call_body(ffn_backward, gated ? "_gated_ffn_bwd" : "_gelu_ffn_bwd", g, x, preact,
                         w_in, w_out, act, gated, all_grads, kernels);
      };
      const auto out = forward(cuda::kActivationKernels), out_ref = forward(cpu::kActivationKernels);
      // Both backward passes from the CPU forward's preact: the same inputs.
      const auto grads = backward(std::get<1>(out_ref), cuda::kActivationKernels);
      const auto grads_ref = backward(std::get<1>(out_ref), cpu::kActivationKernels);
      EXPECT_TRUE(matches(std::get<0>(out), std::get<0>(out_ref), dtype)) << "out";
      EXPECT_TRUE(matches(std::get<1>(out), std::get<1>(out_ref), dtype)) << "preact";
      // Without a backward to feed (plain: the kernel writes h over z): the same output.
      const auto out_over_preact = forward(cuda::kActivationKernels, /*keep_preact=*/false);
      EXPECT_TRUE(matches(std::get<0>(out_over_preact), std::get<0>(out_ref), dtype))
          << "out, activation written over the pre-activation";
      EXPECT_EQ(std::get<1>(out_over_preact).numel(), 0);
      EXPECT_TRUE(matches(std::get<0>(grads), std::get<0>(grads_ref), dtype)) << "grad_x";
      EXPECT_TRUE(matches(std::get<1>(grads), std::get<1>(grads_ref), dtype)) << "grad_w_in";
      EXPECT_TRUE(matches(std::get<2>(grads), std::get<2>(grads_ref), dtype)) << "grad_b_in";
      EXPECT_TRUE(matches(std::get<3>(grads), std::get<3>(grads_ref), dtype)) << "grad_w_out";
      EXPECT_TRUE(matches(std::get<4>(grads), std::get<4>(grads_ref), dtype)) << "grad_b_out";
    }
  }
}

// Telemetry: counts exactly, sums to float64 rounding of float32 row sums.
TEST_F(SeededTest, EmulatedFfnStatsMatchCpu) {
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> shapes = {
      {1, 1, 1}, {7, 5, 13}, {9, 24, 64}, {40, 33, 2051}, {300, 8, 8}, {0, 4, 4}};
  // ffn_input and preact dtypes need not agree.
  const std::vector<std::pair<at::ScalarType, at::ScalarType>> dtypes = {
      {at::kFloat, at::kFloat}, {at::kBFloat16, at::kBFloat16}, {at::kFloat, at::kHalf},
      {at::kHalf, at::kDouble}};
  for (const auto& [x_dtype, z_dtype] : dtypes) {
    {
      for (const auto& [rows, d, F] : shapes) {
        for (const char* act : {"silu", "gelu", "gelu_tanh", "relu"}) {
          for (const bool gated : {true, false}) {
            SCOPED_TRACE(describe("x", x_dtype, "preact", z_dtype, "rows", rows, "d", d, "F", F, act,
                                  gated ? "gated" : "plain"));
            const Tensor x = (at::randn({rows, d}, at::kDouble) + 0.3).to(x_dtype);
            Tensor z = (at::randn({rows, gated ? 2 * F : F}, at::kDouble) * 1.5).to(z_dtype);
            if (rows > 2) z[1][0] = 40;  // an outlier: the second pass has a row to count
            const Tensor got =
                call_body(ffn_stats_body, x, z, act, gated, 0.05, 3.0, 6.0, cuda::kTelemetryKernels);
            const Tensor want =
                call_body(ffn_stats_body, x, z, act, gated, 0.05, 3.0, 6.0, cpu::kTelemetryKernels);
            EXPECT_TRUE(all_close(got, want, {1e-5, 1e-6 * (1 + rms(want))}))
                << "stats " << got << " vs " << want;
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace ffn::testing
