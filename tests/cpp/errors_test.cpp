// Bad input: every op raises a c10::Error whose message names the op, the
// argument and what was expected.
#include "testing.h"

#include <limits>

namespace ffn::testing {
namespace {

TEST(Errors, NormInput) {
  const Tensor x = at::randn({4, 8});
  const Tensor w = at::ones({8});
  EXPECT_ERROR_WITH(ops::rms_norm(at::ones({4, 8}, at::kLong), w, std::nullopt, 1e-6),
                    "ffn.rms_norm: x must be float64, float32, float16 or bfloat16, got Long");
  EXPECT_ERROR_WITH(ops::layer_norm(at::scalar_tensor(1.0), std::nullopt, std::nullopt, 1e-5),
                    "ffn.layer_norm: x must have at least 1 dimension");
  EXPECT_ERROR_WITH(ops::layer_norm(x, at::ones({7}), std::nullopt, 1e-5),
                    "ffn.layer_norm: weight must have shape [8], got [7]");
  EXPECT_ERROR_WITH(ops::rms_norm(x, w, at::ones({2, 8}), 1e-6),
                    "ffn.rms_norm: bias must have shape [8], got [2, 8]");
  EXPECT_ERROR_WITH(ops::layer_norm(x, at::ones({8}, at::kDouble), std::nullopt, 1e-5),
                    "ffn.layer_norm: weight must have x's dtype (Float), got Double");
  // float32 parameters are fine next to half x, but weight and bias must agree.
  EXPECT_ERROR_WITH(ops::rms_norm(x.to(at::kBFloat16), w, at::ones({8}, at::kBFloat16), 1e-6),
                    "ffn.rms_norm: bias must have weight's dtype (Float), got BFloat16");
}

TEST(Errors, NormEps) {
  const Tensor x = at::randn({4, 8});
  EXPECT_ERROR_WITH(ops::rms_norm(x, std::nullopt, std::nullopt, -1e-6),
                    "ffn.rms_norm: eps must be a finite number >= 0");
  EXPECT_ERROR_WITH(ops::layer_norm(x, std::nullopt, std::nullopt,
                                    std::numeric_limits<double>::quiet_NaN()),
                    "ffn.layer_norm: eps must be a finite number >= 0, got nan");
  EXPECT_ERROR_WITH(ops::layer_norm(x, std::nullopt, std::nullopt,
                                    std::numeric_limits<double>::infinity()),
                    "ffn.layer_norm: eps must be a finite number >= 0, got inf");
}

// The dispatcher would reject a CPU/meta mix before our kernel runs (no meta
// kernel in C++); the op body's own device check is reached through the C++ API.
TEST(Errors, NormDevice) {
  const Tensor x = at::randn({4, 8});
  const Tensor meta_weight = at::ones({8}, at::TensorOptions().device(at::kMeta));
  EXPECT_ERROR_WITH(call_body(rms_norm_fwd<cpu::kNormKernels>, x, meta_weight, std::nullopt, 1e-6, 0.0,
                              false),
                    "ffn.rms_norm: weight is on meta but x is on cpu");
}

TEST(Errors, NormBackward) {
  const Tensor x = at::randn({4, 8});
  const Tensor w = at::ones({8});
  const auto [y, mean, rstd] = ops::layer_norm_fwd(x, w, std::nullopt, 1e-5);
  EXPECT_ERROR_WITH(ops::layer_norm_bwd(at::ones({4, 7}), x, mean, rstd, w, std::nullopt, true, false),
                    "ffn.layer_norm: the output gradient must have shape [4, 8] and dtype Float");
  EXPECT_ERROR_WITH(ops::layer_norm_bwd(y, x, mean, rstd, std::nullopt, std::nullopt, true, false),
                    "ffn.layer_norm: weight_grad needs the weight");
  EXPECT_ERROR_WITH(ops::layer_norm_bwd(y, x, mean, rstd, w, std::nullopt, false, true),
                    "ffn.layer_norm: bias_grad needs the bias");
  EXPECT_ERROR_WITH(ops::rms_norm_bwd(y, x, rstd.narrow(0, 0, 3), w, std::nullopt, true, false),
                    "ffn.rms_norm: rstd must hold one Float per row (4)");
}

TEST(Errors, GeluFfn) {
  const Tensor x = at::randn({4, 8});
  const Tensor w1 = at::randn({16, 8}), w2 = at::randn({8, 16});
  EXPECT_ERROR_WITH(ops::gelu_ffn(x.to(at::kInt), w1, std::nullopt, w2, std::nullopt, "none"),
                    "ffn.gelu_ffn: x must be float64, float32, float16 or bfloat16, got Int");
  EXPECT_ERROR_WITH(ops::gelu_ffn(x, at::randn({16, 7}), std::nullopt, w2, std::nullopt, "none"),
                    "ffn.gelu_ffn: w1 must have shape [*, 8], got [16, 7]");
  EXPECT_ERROR_WITH(ops::gelu_ffn(x, at::randn({16}), std::nullopt, w2, std::nullopt, "none"),
                    "ffn.gelu_ffn: w1 must be a 2-D [out_features, in_features] weight");
  EXPECT_ERROR_WITH(ops::gelu_ffn(x, w1, std::nullopt, at::randn({8, 15}), std::nullopt, "none"),
                    "ffn.gelu_ffn: w2 must have shape [*, 16], got [8, 15]");
  EXPECT_ERROR_WITH(ops::gelu_ffn(x, w1, at::randn({8}), w2, std::nullopt, "none"),
                    "ffn.gelu_ffn: b1 must have shape [16], got [8]");
  EXPECT_ERROR_WITH(ops::gelu_ffn(x, w1, std::nullopt, w2, at::randn({16}), "none"),
                    "ffn.gelu_ffn: b2 must have shape [8], got [16]");
  EXPECT_ERROR_WITH(ops::gelu_ffn(x, w1.to(at::kDouble), std::nullopt, w2, std::nullopt, "none"),
                    "ffn.gelu_ffn: w1 must have x's dtype (Float), got Double");
  EXPECT_ERROR_WITH(ops::gelu_ffn(x, w1, std::nullopt, w2, std::nullopt, "sigmoid"),
                    "ffn.gelu_ffn: approximate must be 'none' or 'tanh' (as in F.gelu), got 'sigmoid'");
}

TEST(Errors, GatedFfn) {
  const Tensor x = at::randn({4, 8});
  const Tensor w_gate_up = at::randn({32, 8}), w_down = at::randn({8, 16});
  EXPECT_ERROR_WITH(
      ops::swiglu(x, at::randn({31, 8}), std::nullopt, w_down, std::nullopt),
      "ffn.swiglu: w_gate_up must have an even number of rows");
  EXPECT_ERROR_WITH(
      ops::geglu(x, w_gate_up, std::nullopt, at::randn({8, 32}), std::nullopt),
      "ffn.geglu: w_down must have shape [*, 16], got [8, 32]");
  EXPECT_ERROR_WITH(
      ops::reglu(x, w_gate_up, at::randn({16}), w_down, std::nullopt),
      "ffn.reglu: b_gate_up must have shape [32], got [16]");
  EXPECT_ERROR_WITH(ops::swiglu(x.to(at::kDouble), w_gate_up, std::nullopt,
                                   w_down, std::nullopt),
                    "ffn.swiglu: w_gate_up must have x's dtype (Double), got Float");
  EXPECT_ERROR_WITH(ops::gated_ffn_fwd(x, w_gate_up, std::nullopt, w_down, std::nullopt, "tanh"),
                    "ffn._gated_ffn_fwd: activation must be 'silu', 'gelu', 'gelu_tanh' or 'relu', "
                    "got 'tanh'");
}

TEST(Errors, FfnBackward) {
  const Tensor x = at::randn({4, 8});
  const Tensor w_gate_up = at::randn({32, 8}), w_down = at::randn({8, 16});
  const auto [out, preact] = ops::gated_ffn_fwd(x, w_gate_up, std::nullopt, w_down, std::nullopt, "silu");
  const std::array<bool, 5> all = {true, true, true, true, true};
  EXPECT_ERROR_WITH(ops::gated_ffn_bwd(at::ones({4, 9}), x, preact, w_gate_up, w_down, "silu", all),
                    "ffn._gated_ffn_bwd: the output gradient must have shape [4, 8]");
  EXPECT_ERROR_WITH(
      ops::gated_ffn_bwd(out, x, preact.narrow(1, 0, 16), w_gate_up, w_down, "silu", all),
      "ffn._gated_ffn_bwd: preact must be a [4, 32] Float tensor on x's device, got [4, 16]");
  EXPECT_ERROR_WITH(ops::gelu_ffn_bwd(out, x, preact, w_gate_up, w_down, "none", all),
                    "ffn._gelu_ffn_bwd: w1 must have shape [16, 8], got [32, 8]");
}

TEST(Errors, ElementwisePieces) {
  EXPECT_ERROR_WITH(ops::gated_activation(at::randn({4, 9}), "silu"),
                    "ffn.gated_activation: gate_up's last dimension must be even");
  EXPECT_ERROR_WITH(ops::gated_activation(at::randn({4, 8}), "swish"),
                    "ffn.gated_activation: activation must be 'silu', 'gelu', 'gelu_tanh' or "
                    "'relu', got 'swish'");
  EXPECT_ERROR_WITH(ops::gated_activation_bwd(at::randn({4, 8}), at::randn({4, 8}), "silu"),
                    "ffn._gated_activation_bwd: the output gradient must have shape [4, 4]");
  EXPECT_ERROR_WITH(ops::bias_gelu(at::randn({4, 8}), at::randn({7}), "none"),
                    "ffn.bias_gelu: bias must have shape [8], got [7]");
  EXPECT_ERROR_WITH(ops::bias_gelu(at::randn({4, 8}), at::randn({8}, at::kDouble), "none"),
                    "ffn.bias_gelu: bias must have x's dtype (Float), got Double");
  EXPECT_ERROR_WITH(ops::bias_gelu(at::randn({4, 8}), std::nullopt, "erf"),
                    "ffn.bias_gelu: approximate must be 'none' or 'tanh'");
  EXPECT_ERROR_WITH(ops::bias_gelu_bwd(at::randn({4, 8}), at::randn({4, 8}), std::nullopt, "none", true),
                    "ffn._bias_gelu_bwd: bias_grad needs the bias");
}

}  // namespace
}  // namespace ffn::testing
