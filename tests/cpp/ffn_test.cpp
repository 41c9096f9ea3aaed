// FFN ops (gelu_ffn, swiglu, geglu, reglu) and the elementwise pieces
// (gated_activation, bias_gelu) against the ATen composite: at::linear +
// at::gelu / at::silu / at::relu forward, autograd through it for the backward
// ops, and the determinism of the weight gradients.
#include "testing.h"

#include <cmath>

namespace ffn::testing {
namespace {

// The activations by the name the gated ops use ("gelu_tanh" = gelu with
// approximate="tanh"), as ATen computes them.
Tensor aten_activation(const Tensor& z, std::string_view name) {
  if (name == "gelu") return at::gelu(z, "none");
  if (name == "gelu_tanh") return at::gelu(z, "tanh");
  if (name == "silu") return at::silu(z);
  if (name == "relu") return at::relu(z);
  ADD_FAILURE() << "unknown activation " << name;
  return z;
}

// act(gate) * up on a packed [..., 2F] tensor, gate half first.
Tensor aten_gated(const Tensor& gate_up, std::string_view activation) {
  const auto parts = gate_up.chunk(2, -1);
  return aten_activation(parts[0], activation) * parts[1];
}

struct FfnCase {
  const char* op;          // the public op
  const char* activation;  // as in aten_activation
  bool gated;
};
const std::vector<FfnCase> kFfnCases = {{"gelu_ffn", "gelu", false},
                                        {"gelu_ffn", "gelu_tanh", false},
                                        {"swiglu", "silu", true},
                                        {"geglu", "gelu", true},
                                        {"reglu", "relu", true}};

std::string_view approximate_of(const FfnCase& c) {
  return std::string_view(c.activation) == "gelu_tanh" ? "tanh" : "none";
}

struct FfnWeights {
  Tensor w_in, b_in, w_out, b_out;
};

// nn.Linear-like scales: pre-activations and outputs of order 1.
FfnWeights make_weights(const FfnCase& c, int64_t d, int64_t d_ff, bool biases,
                        at::ScalarType dtype) {
  auto make = [&](at::IntArrayRef shape, int64_t fan_in) {
    return (at::randn(shape, at::kDouble) / std::sqrt(static_cast<double>(fan_in))).to(dtype);
  };
  const int64_t in_rows = (c.gated ? 2 : 1) * d_ff;
  return {make({in_rows, d}, d), biases ? make({in_rows}, 4) : Tensor(), make({d, d_ff}, d_ff),
          biases ? make({d}, 4) : Tensor()};
}

FfnWeights cast(const FfnWeights& w, at::ScalarType dtype) {
  auto to = [&](const Tensor& t) { return t.defined() ? t.to(dtype) : Tensor(); };
  return {to(w.w_in), to(w.b_in), to(w.w_out), to(w.b_out)};
}

// With `preact` given, the pre-activation takes its values (what our forward
// saved, as the backward op sees it) while gradients still flow through
// x w_in^T + b_in: a reference for the backward math alone.
Tensor aten_ffn(const FfnCase& c, const Tensor& x, const FfnWeights& w,
                const Tensor& preact = Tensor()) {
  Tensor z = at::linear(x, w.w_in, opt(w.b_in));
  if (preact.defined()) z = z + (preact.to(z.scalar_type()).view(z.sizes()) - z).detach();
  const Tensor h = c.gated ? aten_gated(z, c.activation) : aten_activation(z, c.activation);
  return at::linear(h, w.w_out, opt(w.b_out));
}

// The public op of the case (ffn_ops.h).
Tensor ffn_public(const FfnCase& c, const Tensor& x, const FfnWeights& w) {
  const std::string_view op = c.op;
  if (!c.gated) return ops::gelu_ffn(x, w.w_in, opt(w.b_in), w.w_out, opt(w.b_out), approximate_of(c));
  if (op == "swiglu") return ops::swiglu(x, w.w_in, opt(w.b_in), w.w_out, opt(w.b_out));
  if (op == "geglu") return ops::geglu(x, w.w_in, opt(w.b_in), w.w_out, opt(w.b_out));
  if (op == "reglu") return ops::reglu(x, w.w_in, opt(w.b_in), w.w_out, opt(w.b_out));
  ADD_FAILURE() << "no public op " << op;
  return Tensor();
}

Tensors2 ffn_fwd(const FfnCase& c, const Tensor& x, const FfnWeights& w) {
  return c.gated ? ops::gated_ffn_fwd(x, w.w_in, opt(w.b_in), w.w_out, opt(w.b_out), c.activation)
                 : ops::gelu_ffn_fwd(x, w.w_in, opt(w.b_in), w.w_out, opt(w.b_out),
                                     approximate_of(c));
}

Tensors5 ffn_bwd(const FfnCase& c, const Tensor& g, const Tensor& x, const Tensor& preact,
                 const FfnWeights& w, std::array<bool, 5> mask) {
  return c.gated ? ops::gated_ffn_bwd(g, x, preact, w.w_in, w.w_out, c.activation, mask)
                 : ops::gelu_ffn_bwd(g, x, preact, w.w_in, w.w_out, approximate_of(c), mask);
}

// Sums of many rounded terms (GEMM outputs, bias gradients summed over rows):
// in bfloat16 their error scales with the result's overall magnitude, not
// with each element's.
Tolerance reduction_tolerance(at::ScalarType dtype, const Tensor& expected) {
  Tolerance tol = tolerance_for(dtype);
  if (dtype == at::kBFloat16) tol.atol = tol.rtol * rms(expected);
  return tol;
}

// 0 rows, 3-D input, tails: d = 7, 33, 127 and d_ff = 17 (a 1-element tail
// for every vector width) are no multiple of any vector width.
const std::vector<std::vector<int64_t>> kFfnShapes = {{5, 7}, {0, 16}, {2, 3, 33}, {4, 127}};
constexpr int64_t kDff = 17;

TEST_F(SeededTest, FfnForwardMatchesAtenComposite) {
  for (const FfnCase& c : kFfnCases) {
    for (const auto& shape : kFfnShapes) {
      for (const auto dtype : {at::kDouble, at::kFloat, at::kBFloat16}) {
        for (const bool biases : {true, false}) {
          SCOPED_TRACE(describe(c.op, c.activation, "shape", at::IntArrayRef(shape), dtype,
                                "biases", biases));
          const Tensor x = at::randn(shape, at::kDouble).to(dtype);
          const FfnWeights w = make_weights(c, shape.back(), kDff, biases, dtype);
          const auto ref_dtype = compute_dtype(dtype);
          const Tensor expected = aten_ffn(c, x.to(ref_dtype), cast(w, ref_dtype)).to(dtype);

          const Tensor out = ffn_public(c, x, w);
          EXPECT_EQ(out.scalar_type(), dtype);
          EXPECT_TRUE(all_close(out, expected, reduction_tolerance(dtype, expected)));

          // The internal forward: same output, and the pre-activation it saves
          // is x w_in^T + b_in as a [rows, w_in rows] matrix.
          const auto [out_fwd, preact] = ffn_fwd(c, x, w);
          EXPECT_TRUE(at::equal(out_fwd, out));
          const Tensor z = at::linear(x.to(ref_dtype), w.w_in.to(ref_dtype),
                                      opt(cast(w, ref_dtype).b_in))
                               .reshape({-1, w.w_in.size(0)});
          EXPECT_TRUE(all_close(preact, z.to(dtype), reduction_tolerance(dtype, z)));
        }
      }
    }
  }
}

TEST_F(SeededTest, FfnCppApiMatchesDispatcher) {
  const Tensor x = at::randn({3, 4, 24});
  for (const FfnCase& c : kFfnCases) {
    SCOPED_TRACE(describe(c.op, c.activation));
    const FfnWeights w = make_weights(c, 24, 40, true, at::kFloat);
    const Activation act = c.gated ? parse_gated_activation(c.op, c.activation)
                                   : parse_gelu_approximate(c.op, approximate_of(c));
    const auto [out, preact] = call_body(ffn_forward, c.op, x, w.w_in, w.b_in, w.w_out, w.b_out,
                                         act, c.gated, cpu::kActivationKernels, /*keep_preact=*/true);
    // Without a backward to come (the public function's call: nothing requires grad), the
    // activation overwrites the pre-activation: the same output, no preact.
    const auto [out_inference, no_preact] =
        call_body(ffn_forward, c.op, x, w.w_in, w.b_in, w.w_out, w.b_out, act, c.gated,
                  cpu::kActivationKernels, /*keep_preact=*/false);
    EXPECT_TRUE(at::equal(out_inference, out));
    EXPECT_EQ(no_preact.numel(), 0);
    EXPECT_TRUE(at::equal(out, ffn_public(c, x, w)));
    EXPECT_TRUE(at::equal(preact, std::get<1>(ffn_fwd(c, x, w))));
    const Tensor g = at::randn_like(out);
    const auto grads = call_body(ffn_backward, c.gated ? "_gated_ffn_bwd" : "_gelu_ffn_bwd", g, x,
                                 preact, w.w_in, w.w_out, act, c.gated,
                                 std::array<bool, 5>{true, true, true, true, true},
                                 cpu::kActivationKernels);
    const auto grads_op = ffn_bwd(c, g, x, preact, w, {true, true, true, true, true});
    EXPECT_TRUE(at::equal(std::get<0>(grads), std::get<0>(grads_op)));
    EXPECT_TRUE(at::equal(std::get<1>(grads), std::get<1>(grads_op)));
    EXPECT_TRUE(at::equal(std::get<3>(grads), std::get<3>(grads_op)));
  }
}

// Our backward op's gradients (x, w_in, b_in, w_out, b_out) as a vector; those
// outside the mask must be empty and come back undefined.
std::vector<Tensor> ffn_grads(const FfnCase& c, const Tensor& g, const Tensor& x,
                              const FfnWeights& w, std::array<bool, 5> mask) {
  const auto [out, preact] = ffn_fwd(c, x, w);
  const auto [gx, gw_in, gb_in, gw_out, gb_out] = ffn_bwd(c, g, x, preact, w, mask);
  std::vector<Tensor> grads = {gx, gw_in, gb_in, gw_out, gb_out};
  for (size_t k = 0; k < grads.size(); ++k) {
    if (!mask[k]) {
      EXPECT_EQ(grads[k].numel(), 0) << "gradient " << k << " was not requested";
      grads[k] = Tensor();
    }
  }
  return grads;
}

// Autograd through the ATen composite, in float64, for the inputs in `mask`
// (with `preact`: at that pre-activation, see aten_ffn).
std::vector<Tensor> aten_ffn_grads(const FfnCase& c, const Tensor& g, const Tensor& x,
                                   const FfnWeights& w, std::array<bool, 5> mask,
                                   const Tensor& preact = Tensor()) {
  const FfnWeights w64 = cast(w, at::kDouble);
  const std::vector<Tensor> all = {x.to(at::kDouble), w64.w_in, w64.b_in, w64.w_out, w64.b_out};
  std::vector<Tensor> wanted;
  for (size_t k = 0; k < all.size(); ++k) wanted.push_back(mask[k] ? all[k] : Tensor());
  auto forward = [&](const std::vector<Tensor>& in) {
    auto pick = [&](size_t k) { return in[k].defined() ? in[k] : all[k]; };
    return aten_ffn(c, pick(0), {pick(1), pick(2), pick(3), pick(4)}, preact);
  };
  return autograd_grads(forward, wanted, g.to(at::kDouble));
}

void expect_ffn_grads_close(const std::vector<Tensor>& actual, const std::vector<Tensor>& expected,
                            at::ScalarType dtype, double atol_factor = 1) {
  const char* names[] = {"grad_x", "grad_w_in", "grad_b_in", "grad_w_out", "grad_b_out"};
  for (size_t k = 0; k < actual.size(); ++k) {
    SCOPED_TRACE(names[k]);
    ASSERT_EQ(actual[k].defined(), expected[k].defined());
    if (actual[k].defined()) {
      EXPECT_EQ(actual[k].scalar_type(), dtype);
      Tolerance tol = reduction_tolerance(dtype, expected[k]);
      tol.atol *= atol_factor;
      EXPECT_TRUE(all_close(actual[k], expected[k], tol));
    }
  }
}

TEST_F(SeededTest, FfnBackwardMatchesAutogradFloat64) {
  const std::vector<std::array<bool, 5>> masks = {{true, true, true, true, true},
                                                  {true, false, false, false, false},
                                                  {false, true, true, false, false},
                                                  {false, false, false, true, true},
                                                  {false, false, false, true, false}};
  for (const FfnCase& c : kFfnCases) {
    for (const auto& shape : kFfnShapes) {
      for (const bool biases : {true, false}) {
        for (auto mask : masks) {
          if (!biases) mask[2] = mask[4] = false;
          SCOPED_TRACE(describe(c.op, c.activation, "shape", at::IntArrayRef(shape), "biases",
                                biases, "mask", mask[0], mask[1], mask[2], mask[3], mask[4]));
          const Tensor x = at::randn(shape, at::kDouble);
          const FfnWeights w = make_weights(c, shape.back(), kDff, biases, at::kDouble);
          const Tensor g = at::randn(shape, at::kDouble);
          expect_ffn_grads_close(ffn_grads(c, g, x, w, mask), aten_ffn_grads(c, g, x, w, mask),
                                 at::kDouble);
        }
      }
    }
  }
}

// The float32 and bfloat16 backward kernels against float64 autograd at the
// pre-activation our forward saved. (Against the exact pre-activation, ReGLU's
// gradient legitimately differs by O(1) wherever the rounded gate crosses 0.)
// The bfloat16 backward rounds two intermediates (grad_h, grad_z) to bfloat16
// before its GEMMs, as ATen's composite does, hence twice the forward's atol.
TEST_F(SeededTest, FfnBackwardLowPrecisionMatchesAutograd) {
  const std::array<bool, 5> all = {true, true, true, true, true};
  for (const FfnCase& c : kFfnCases) {
    for (const auto dtype : {at::kFloat, at::kBFloat16}) {
      SCOPED_TRACE(describe(c.op, c.activation, dtype));
      const Tensor x = at::randn({2, 3, 33}, at::kDouble).to(dtype);
      const FfnWeights w = make_weights(c, 33, kDff, true, dtype);
      const Tensor g = at::randn({2, 3, 33}, at::kDouble).to(dtype);
      const Tensor preact = std::get<1>(ffn_fwd(c, x, w));
      expect_ffn_grads_close(ffn_grads(c, g, x, w, all), aten_ffn_grads(c, g, x, w, all, preact),
                             dtype, /*atol_factor=*/2);
    }
  }
}

TEST_F(SeededTest, FfnWeightGradsAreDeterministic) {
  const std::array<bool, 5> all = {true, true, true, true, true};
  for (const FfnCase& c : kFfnCases) {
    SCOPED_TRACE(describe(c.op, c.activation));
    const Tensor x = at::randn({512, 64});
    const FfnWeights w = make_weights(c, 64, 96, true, at::kFloat);
    const Tensor g = at::randn({512, 64});
    const auto first = ffn_grads(c, g, x, w, all);
    const auto second = ffn_grads(c, g, x, w, all);
    for (size_t k = 0; k < first.size(); ++k) {
      EXPECT_TRUE(at::equal(first[k], second[k])) << "gradient " << k;
    }
  }
}

// ---------------------------------------------------------------------------
// gated_activation and bias_gelu.

const std::vector<const char*> kGatedActivations = {"silu", "gelu", "gelu_tanh", "relu"};
// Packed [..., 2F]: F = 7, 4 (0 rows), 33, 4097.
const std::vector<std::vector<int64_t>> kGateUpShapes = {{5, 14}, {0, 8}, {2, 3, 66}, {3, 8194}};

TEST_F(SeededTest, GatedActivationForwardMatchesAten) {
  for (const char* activation : kGatedActivations) {
    for (const auto& shape : kGateUpShapes) {
      for (const auto dtype : {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf}) {
        SCOPED_TRACE(describe(activation, "shape", at::IntArrayRef(shape), dtype));
        const Tensor gate_up = (at::randn(shape, at::kDouble) * 2).to(dtype);
        const Tensor h = ops::gated_activation(gate_up, activation);
        EXPECT_EQ(h.scalar_type(), dtype);
        const Tensor expected = aten_gated(gate_up.to(compute_dtype(dtype)), activation).to(dtype);
        EXPECT_TRUE(all_close(h, expected, tolerance_for(dtype)));
      }
    }
  }
  const Tensor gate_up = at::randn({4, 2 * 37});
  EXPECT_TRUE(at::equal(call_body(gated_activation_forward, gate_up, "silu", cpu::kActivationKernels),
                        ops::gated_activation(gate_up, "silu")));
}

TEST_F(SeededTest, GatedActivationBackwardMatchesAutograd) {
  for (const char* activation : kGatedActivations) {
    for (const auto& shape : kGateUpShapes) {
      for (const auto dtype : {at::kDouble, at::kFloat, at::kBFloat16}) {
        SCOPED_TRACE(describe(activation, "shape", at::IntArrayRef(shape), dtype));
        const Tensor gate_up = (at::randn(shape, at::kDouble) * 2).to(dtype);
        std::vector<int64_t> h_shape = shape;
        h_shape.back() /= 2;
        const Tensor grad = at::randn(h_shape, at::kDouble).to(dtype);
        const Tensor actual = ops::gated_activation_bwd(grad, gate_up, activation);
        EXPECT_EQ(actual.scalar_type(), dtype);
        const auto expected = autograd_grads(
            [&](const std::vector<Tensor>& in) { return aten_gated(in[0], activation); },
            {gate_up.to(at::kDouble)}, grad.to(at::kDouble));
        EXPECT_TRUE(all_close(actual, expected[0], tolerance_for(dtype)));
      }
    }
  }
}

const std::vector<std::vector<int64_t>> kBiasGeluShapes = {{5, 7}, {0, 16}, {2, 3, 33}, {3, 4097}};

TEST_F(SeededTest, BiasGeluForwardMatchesAten) {
  for (const char* approximate : {"none", "tanh"}) {
    for (const auto& shape : kBiasGeluShapes) {
      for (const auto dtype : {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf}) {
        for (const bool with_bias : {true, false}) {
          SCOPED_TRACE(describe(approximate, "shape", at::IntArrayRef(shape), dtype, "bias",
                                with_bias));
          const Tensor x = (at::randn(shape, at::kDouble) * 2).to(dtype);
          const Tensor bias = with_bias ? at::randn({shape.back()}, at::kDouble).to(dtype) : Tensor();
          const Tensor y = ops::bias_gelu(x, opt(bias), approximate);
          EXPECT_EQ(y.scalar_type(), dtype);
          // x + bias rounds to x's dtype first, as in the composite F.gelu(x + bias).
          const Tensor z = with_bias ? x + bias : x;
          const Tensor expected = at::gelu(z.to(compute_dtype(dtype)), approximate).to(dtype);
          EXPECT_TRUE(all_close(y, expected, tolerance_for(dtype)));
        }
      }
    }
  }
}

TEST_F(SeededTest, BiasGeluBackwardMatchesAutograd) {
  for (const char* approximate : {"none", "tanh"}) {
    for (const auto& shape : kBiasGeluShapes) {
      for (const auto dtype : {at::kDouble, at::kFloat, at::kBFloat16}) {
        for (const bool with_bias : {true, false}) {
          SCOPED_TRACE(describe(approximate, "shape", at::IntArrayRef(shape), dtype, "bias",
                                with_bias));
          const Tensor x = (at::randn(shape, at::kDouble) * 2).to(dtype);
          const Tensor bias = with_bias ? at::randn({shape.back()}, at::kDouble).to(dtype) : Tensor();
          const Tensor grad = at::randn(shape, at::kDouble).to(dtype);
          const auto [gx, gb] = ops::bias_gelu_bwd(grad, x, opt(bias), approximate, with_bias);
          EXPECT_EQ(gb.numel(), with_bias ? shape.back() : 0);
          // The reference sees the pre-activation the kernel sees: x + bias rounded to dtype.
          const Tensor z = (with_bias ? x + bias : x).to(at::kDouble);
          const auto expected = autograd_grads(
              [&](const std::vector<Tensor>& in) { return at::gelu(in[0], approximate); }, {z},
              grad.to(at::kDouble));
          EXPECT_TRUE(all_close(gx, expected[0], tolerance_for(dtype)));
          if (with_bias) {
            const Tensor expected_gb = expected[0].reshape({-1, shape.back()}).sum(0);
            EXPECT_TRUE(all_close(gb, expected_gb, reduction_tolerance(dtype, expected_gb)));
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace ffn::testing
