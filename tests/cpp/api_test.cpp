// The C++ API of csrc/ffn_ops.h beyond what the kernel tests exercise through
// it: the schema defaults, the public ops that only select an internal op's
// outputs (the fused add + norms, relu_ffn) or its gate (swiglu/geglu/reglu and
// their `approximate`), the in-place backward, and ffn_stats.
#include "testing.h"

namespace ffn::testing {
namespace {

TEST_F(SeededTest, ApiDefaultsAreTheSchemas) {
  const Tensor x = at::randn({6, 40});
  const Tensor w = at::randn({40}), b = at::randn({40});
  EXPECT_TRUE(at::equal(ops::layer_norm(x, w, b), ops::layer_norm(x, w, b, 1e-5, 0.0, false)));
  EXPECT_TRUE(at::equal(ops::rms_norm(x, w, b), ops::rms_norm(x, w, b, 1e-6, 0.0, false)));
  EXPECT_TRUE(at::equal(std::get<0>(ops::add_rms_norm(x, x, w, b)),
                        std::get<0>(ops::add_rms_norm(x, x, w, b, 1e-6))));
  EXPECT_TRUE(at::equal(std::get<0>(ops::add_layer_norm(x, x, w, b)),
                        std::get<0>(ops::add_layer_norm(x, x, w, b, 1e-5))));
  const Tensor w1 = at::randn({24, 40}) * 0.2, w2 = at::randn({40, 24}) * 0.2;
  EXPECT_TRUE(at::equal(ops::gelu_ffn(x, w1, std::nullopt, w2, std::nullopt),
                        ops::gelu_ffn(x, w1, std::nullopt, w2, std::nullopt, "none")));
  const Tensor gate_up = at::randn({6, 48});
  EXPECT_TRUE(at::equal(ops::gated_activation(gate_up), ops::gated_activation(gate_up, "silu")));
  EXPECT_TRUE(at::equal(ops::bias_gelu(x, b), ops::bias_gelu(x, b, "none")));
  const Tensor preact = at::randn({6, 48});
  EXPECT_TRUE(at::equal(ops::ffn_stats(x, preact, "silu", true),
                        ops::ffn_stats(x, preact, "silu", true, 0.01, 6.0, 6.0)));
}

// The fused residual add + norms: (y, s) with s = x + residual in x's dtype
// and y the norm of s, the first two outputs of the internal op.
TEST_F(SeededTest, ApiAddNormsReturnYAndS) {
  for (const auto dtype : {at::kFloat, at::kBFloat16}) {
    SCOPED_TRACE(describe(dtype));
    const Tensor x = at::randn({2, 5, 64}).to(dtype), residual = at::randn({2, 5, 64}).to(dtype);
    const Tensor w = at::randn({64}).to(dtype), b = at::randn({64}).to(dtype);
    const auto [y_ln, s_ln] = ops::add_layer_norm(x, residual, w, b, 1e-5, 1.0);
    const auto [y_ref, s_ref, mean, rstd] = ops::add_layer_norm_fwd(x, residual, w, b, 1e-5, 1.0);
    EXPECT_TRUE(at::equal(s_ln, x + residual));
    EXPECT_TRUE(at::equal(y_ln, y_ref));
    EXPECT_TRUE(at::equal(s_ln, s_ref));
    EXPECT_TRUE(all_close(y_ln, ops::layer_norm(x + residual, w, b, 1e-5, 1.0), tolerance_for(dtype)));

    const auto [y_rms, s_rms] = ops::add_rms_norm(x, residual, w, std::nullopt);
    EXPECT_TRUE(at::equal(s_rms, x + residual));
    EXPECT_TRUE(at::equal(y_rms, std::get<0>(ops::add_rms_norm_fwd(x, residual, w, std::nullopt,
                                                                    1e-6))));
    EXPECT_TRUE(all_close(y_rms, ops::rms_norm(x + residual, w, std::nullopt), tolerance_for(dtype)));
  }
}

TEST_F(SeededTest, ApiReluFfnMatchesAten) {
  const Tensor x = at::randn({3, 4, 24}, at::kDouble);
  const Tensor w1 = at::randn({40, 24}, at::kDouble) * 0.2, b1 = at::randn({40}, at::kDouble);
  const Tensor w2 = at::randn({24, 40}, at::kDouble) * 0.2, b2 = at::randn({24}, at::kDouble);
  const Tensor out = ops::relu_ffn(x, w1, b1, w2, b2);
  EXPECT_TRUE(all_close(out, at::linear(at::relu(at::linear(x, w1, b1)), w2, b2),
                        tolerance_for(at::kDouble)));
  EXPECT_TRUE(at::equal(out, std::get<0>(ops::relu_ffn_fwd(x, w1, b1, w2, b2))));
}

// swiglu/geglu/reglu run _gated_ffn_fwd with their gate; approximate="tanh"
// selects the tanh GELU for geglu and is an error for the other gates.
TEST_F(SeededTest, ApiGatedOpsPickTheirGate) {
  const Tensor x = at::randn({5, 24});
  const Tensor w_gate_up = at::randn({64, 24}) * 0.2, b_gate_up = at::randn({64});
  const Tensor w_down = at::randn({24, 32}) * 0.2;
  auto internal = [&](const char* activation) {
    return std::get<0>(ops::gated_ffn_fwd(x, w_gate_up, b_gate_up, w_down, std::nullopt, activation));
  };
  EXPECT_TRUE(at::equal(ops::swiglu(x, w_gate_up, b_gate_up, w_down, std::nullopt), internal("silu")));
  EXPECT_TRUE(at::equal(ops::geglu(x, w_gate_up, b_gate_up, w_down, std::nullopt), internal("gelu")));
  EXPECT_TRUE(at::equal(ops::geglu(x, w_gate_up, b_gate_up, w_down, std::nullopt, "tanh"),
                        internal("gelu_tanh")));
  EXPECT_TRUE(at::equal(ops::reglu(x, w_gate_up, b_gate_up, w_down, std::nullopt), internal("relu")));
  EXPECT_FALSE(at::equal(internal("gelu"), internal("gelu_tanh")));

  EXPECT_ERROR_WITH(ops::geglu(x, w_gate_up, b_gate_up, w_down, std::nullopt, "erf"),
                    "ffn.geglu: approximate must be 'none' or 'tanh' (as in F.gelu), got 'erf'");
  EXPECT_ERROR_WITH(ops::swiglu(x, w_gate_up, b_gate_up, w_down, std::nullopt, "tanh"),
                    "ffn.swiglu: approximate applies to GELU gates (geglu) only; expected \"none\", "
                    "got \"tanh\"");
  EXPECT_ERROR_WITH(ops::reglu(x, w_gate_up, b_gate_up, w_down, std::nullopt, "tanh"),
                    "ffn.reglu: approximate applies to GELU gates (geglu) only");
}

// The in-place backward ops (Tensor(a!) grad_y): grad_x lands in grad_y, the
// parameter gradients are those of the out-of-place op.
TEST_F(SeededTest, ApiInPlaceNormBackward) {
  const Tensor x = at::randn({7, 96}), w = at::randn({96}), b = at::randn({96});
  const Tensor gy = at::randn({7, 96}), gs = at::randn({7, 96});
  {
    const auto [y, mean, rstd] = ops::layer_norm_fwd(x, w, b, 1e-5);
    const auto [gx, gw, gb] = ops::layer_norm_bwd(gy, x, mean, rstd, w, b, true, true, 0.0, gs);
    Tensor grad = gy.clone();
    const auto [gw_, gb_] = ops::layer_norm_bwd_(grad, x, mean, rstd, w, b, true, true, 0.0, gs);
    EXPECT_TRUE(at::equal(grad, gx));
    EXPECT_TRUE(at::equal(gw_, gw));
    EXPECT_TRUE(at::equal(gb_, gb));
  }
  {
    const auto [y, rstd] = ops::rms_norm_fwd(x, w, b, 1e-6);
    const auto [gx, gw, gb] = ops::rms_norm_bwd(gy, x, rstd, w, b, true, true);
    Tensor grad = gy.clone();
    const auto [gw_, gb_] = ops::rms_norm_bwd_(grad, x, rstd, w, b, true, true);
    EXPECT_TRUE(at::equal(grad, gx));
    EXPECT_TRUE(at::equal(gw_, gw));
    EXPECT_TRUE(at::equal(gb_, gb));
  }
}

// ffn_stats through the API: the CPU body's numbers, and never requiring grad.
TEST_F(SeededTest, ApiFfnStats) {
  const Tensor x = at::randn({9, 16});
  const Tensor preact = at::randn({9, 2 * 24}) * 1.5;
  for (const bool gated : {true, false}) {
    SCOPED_TRACE(describe(gated ? "gated" : "plain"));
    const Tensor z = gated ? preact : preact.narrow(1, 0, 24).contiguous();
    const Tensor stats = ops::ffn_stats(x, z, "gelu", gated, 0.05, 3.0, 6.0);
    EXPECT_EQ(stats.scalar_type(), at::kDouble);
    EXPECT_EQ(stats.numel(), kNumStatFields);
    EXPECT_TRUE(at::equal(stats, call_body(ffn_stats_body, x, z, "gelu", gated, 0.05, 3.0, 6.0,
                                           cpu::kTelemetryKernels)));
    EXPECT_EQ(stats[kTokens].item<double>(), 9);
  }
  const Tensor x_grad = x.clone().requires_grad_(true);
  EXPECT_FALSE(ops::ffn_stats(x_grad, preact, "silu", true).requires_grad());
}

}  // namespace
}  // namespace ffn::testing
