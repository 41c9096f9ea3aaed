// layer_norm / rms_norm CPU kernels against ATen: forward against at::layer_norm
// and at::rms_norm, backward against autograd on them (float64 and the kernels'
// own dtypes) and against central finite differences, and the determinism of
// the weight/bias gradients.
#include "testing.h"

#include <ATen/Parallel.h>

namespace ffn::testing {
namespace {

constexpr double kLayerNormEps = 1e-5;
constexpr double kRmsNormEps = 1e-6;

// Tails of every vector width (d = 1, 7, 127, 4097), 0 rows, 3-D input.
const std::vector<std::vector<int64_t>> kShapes = {
    {4, 1}, {5, 7}, {3, 127}, {2, 4097}, {0, 64}, {2, 3, 33}};
const std::vector<at::ScalarType> kDtypes = {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf};

struct Affine {
  bool weight;
  bool bias;
};
const std::vector<Affine> kAffine = {{true, true}, {true, false}, {false, true}, {false, false}};

// Rows with a mean of about 1.5 and std 2: the shifted inputs where a one-pass
// variance loses digits.
Tensor make_input(at::IntArrayRef shape, at::ScalarType dtype) {
  return (at::randn(shape, at::kDouble) * 2 + 1.5).to(dtype);
}

struct Params {
  Tensor weight, bias;
};
Params make_params(int64_t d, Affine affine, at::ScalarType dtype) {
  return {affine.weight ? (at::randn({d}, at::kDouble) + 1).to(dtype) : Tensor(),
          affine.bias ? at::randn({d}, at::kDouble).to(dtype) : Tensor()};
}

Tensor cast_or_undefined(const Tensor& t, at::ScalarType dtype) {
  return t.defined() ? t.to(dtype) : Tensor();
}

// ATen's op in the compute dtype of x's dtype (float32 for half types).
Tensor aten_layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, at::ScalarType dtype) {
  return at::layer_norm(x.to(dtype), {x.size(-1)}, opt(cast_or_undefined(w, dtype)),
                        opt(cast_or_undefined(b, dtype)), kLayerNormEps);
}
Tensor aten_rms_norm(const Tensor& x, const Tensor& w, const Tensor& b, at::ScalarType dtype) {
  Tensor y = at::rms_norm(x.to(dtype), {x.size(-1)}, opt(cast_or_undefined(w, dtype)), kRmsNormEps);
  return b.defined() ? y + b.to(dtype) : y;
}

TEST_F(SeededTest, NormForwardMatchesAten) {
  for (const auto& shape : kShapes) {
    for (const auto dtype : kDtypes) {
      for (const Affine affine : kAffine) {
        SCOPED_TRACE(describe("shape", at::IntArrayRef(shape), dtype, "weight", affine.weight,
                              "bias", affine.bias));
        const Tensor x = make_input(shape, dtype);
        const auto [w, b] = make_params(shape.back(), affine, dtype);
        const auto ref = compute_dtype(dtype);
        const Tolerance tol = tolerance_for(dtype);

        const Tensor ln = ops::layer_norm(x, opt(w), opt(b), kLayerNormEps);
        EXPECT_EQ(ln.scalar_type(), dtype);
        EXPECT_TRUE(all_close(ln, aten_layer_norm(x, w, b, ref).to(dtype), tol));

        const Tensor rms = ops::rms_norm(x, opt(w), opt(b), kRmsNormEps);
        EXPECT_EQ(rms.scalar_type(), dtype);
        EXPECT_TRUE(all_close(rms, aten_rms_norm(x, w, b, ref).to(dtype), tol));
      }
    }
  }
}

TEST_F(SeededTest, NormSavedStatisticsMatchAten) {
  for (const auto& shape : kShapes) {
    for (const auto dtype : {at::kDouble, at::kFloat, at::kBFloat16}) {
      SCOPED_TRACE(describe("shape", at::IntArrayRef(shape), dtype));
      const Tensor x = make_input(shape, dtype);
      const auto stat = compute_dtype(dtype);
      const Tensor xs = x.to(stat);
      const int64_t d = x.size(-1);
      const Tolerance tol = tolerance_for(stat);

      const auto [y, mean, rstd] = ops::layer_norm_fwd(x, std::nullopt, std::nullopt, kLayerNormEps);
      const auto [ref_y, ref_mean, ref_rstd] =
          at::native_layer_norm(xs, {d}, std::nullopt, std::nullopt, kLayerNormEps);
      EXPECT_EQ(mean.scalar_type(), stat);
      EXPECT_EQ(rstd.scalar_type(), stat);
      EXPECT_TRUE(all_close(mean, ref_mean.squeeze(-1), tol));
      EXPECT_TRUE(all_close(rstd, ref_rstd.squeeze(-1), tol));

      const auto [y_rms, rstd_rms] = ops::rms_norm_fwd(x, std::nullopt, std::nullopt, kRmsNormEps);
      EXPECT_EQ(rstd_rms.scalar_type(), stat);
      EXPECT_TRUE(all_close(rstd_rms, (xs.pow(2).mean(-1) + kRmsNormEps).rsqrt(), tol));
    }
  }
}

// Half-precision x with float32 weight and bias (the usual mixed-precision
// layout): statistics and affine in float32, one rounding to x's dtype.
TEST_F(SeededTest, NormForwardHalfInputFloatParams) {
  for (const auto dtype : {at::kBFloat16, at::kHalf}) {
    SCOPED_TRACE(describe(dtype));
    const Tensor x = make_input({6, 127}, dtype);
    const auto [w, b] = make_params(127, {true, true}, at::kFloat);
    const Tensor ln = ops::layer_norm(x, w, b, kLayerNormEps);
    const Tensor rms = ops::rms_norm(x, w, b, kRmsNormEps);
    EXPECT_EQ(ln.scalar_type(), dtype);
    EXPECT_TRUE(all_close(ln, aten_layer_norm(x, w, b, at::kFloat).to(dtype), tolerance_for(dtype)));
    EXPECT_TRUE(all_close(rms, aten_rms_norm(x, w, b, at::kFloat).to(dtype), tolerance_for(dtype)));
  }
}

TEST_F(SeededTest, NormForwardNonContiguousInput) {
  for (const auto dtype : {at::kFloat, at::kBFloat16}) {
    SCOPED_TRACE(describe(dtype));
    const Tensor x = make_input({127, 9}, dtype).t();  // [9, 127], strides (1, 9)
    ASSERT_FALSE(x.is_contiguous());
    const auto [w, b] = make_params(127, {true, true}, dtype);
    EXPECT_TRUE(all_close(ops::layer_norm(x, w, b, kLayerNormEps),
                          aten_layer_norm(x, w, b, compute_dtype(dtype)).to(dtype),
                          tolerance_for(dtype)));
    EXPECT_TRUE(all_close(ops::rms_norm(x, w, b, kRmsNormEps),
                          aten_rms_norm(x, w, b, compute_dtype(dtype)).to(dtype),
                          tolerance_for(dtype)));
  }
}

// The op bodies (norm.h) with the CPU kernel table are what the dispatcher runs
// for CPU tensors, and the C++ API (ffn_ops.h) calls: same bits.
TEST_F(SeededTest, NormCppApiMatchesDispatcher) {
  const Tensor x = make_input({3, 5, 40}, at::kFloat);
  const auto [w, b] = make_params(40, {true, true}, at::kFloat);
  const auto [y, mean, rstd] =
      call_body(layer_norm_fwd<cpu::kNormKernels>, x, w, b, kLayerNormEps, 0.0, false);
  const auto [y_op, mean_op, rstd_op] = ops::layer_norm_fwd(x, w, b, kLayerNormEps);
  EXPECT_TRUE(at::equal(y, y_op));
  EXPECT_TRUE(at::equal(mean, mean_op));
  EXPECT_TRUE(at::equal(rstd, rstd_op));
  EXPECT_TRUE(at::equal(y, ops::layer_norm(x, w, b, kLayerNormEps)));

  const auto [y_rms, rstd_rms] = call_body(rms_norm_fwd<cpu::kNormKernels>, x, w, std::nullopt,
                                           kRmsNormEps, 0.0, false);
  EXPECT_TRUE(at::equal(y_rms, ops::rms_norm(x, w, std::nullopt, kRmsNormEps)));

  const Tensor gy = at::randn_like(x);
  const auto grads = call_body(layer_norm_bwd<cpu::kNormKernels>, gy, x, mean, rstd, w, b, true,
                               true, 0.0, std::nullopt);
  const auto grads_op = ops::layer_norm_bwd(gy, x, mean, rstd, w, b, true, true);
  EXPECT_TRUE(at::equal(std::get<0>(grads), std::get<0>(grads_op)));
  EXPECT_TRUE(at::equal(std::get<1>(grads), std::get<1>(grads_op)));
  EXPECT_TRUE(at::equal(std::get<2>(grads), std::get<2>(grads_op)));
}

// ---------------------------------------------------------------------------
// Backward.

// Our backward op's (grad_x, grad_weight, grad_bias) for x, w, b (any undefined).
std::vector<Tensor> ffn_norm_grads(bool center, const Tensor& gy, const Tensor& x, const Tensor& w,
                                   const Tensor& b) {
  Tensor gx, gw, gb;
  if (center) {
    const auto [y, mean, rstd] = ops::layer_norm_fwd(x, opt(w), opt(b), kLayerNormEps);
    std::tie(gx, gw, gb) =
        ops::layer_norm_bwd(gy, x, mean, rstd, opt(w), opt(b), w.defined(), b.defined());
  } else {
    const auto [y, rstd] = ops::rms_norm_fwd(x, opt(w), opt(b), kRmsNormEps);
    std::tie(gx, gw, gb) = ops::rms_norm_bwd(gy, x, rstd, opt(w), opt(b), w.defined(), b.defined());
  }
  // Gradients not asked for come back as empty [0] tensors.
  EXPECT_EQ(gw.numel(), w.defined() ? w.numel() : 0);
  EXPECT_EQ(gb.numel(), b.defined() ? b.numel() : 0);
  return {gx, w.defined() ? gw : Tensor(), b.defined() ? gb : Tensor()};
}

// Autograd through at::layer_norm / at::rms_norm (+ bias), in float64.
std::vector<Tensor> aten_norm_grads(bool center, const Tensor& gy, const Tensor& x,
                                    const Tensor& w, const Tensor& b) {
  auto forward = [&](const std::vector<Tensor>& in) {
    const auto f64 = at::kDouble;
    return center ? aten_layer_norm(in[0], in[1], in[2], f64) : aten_rms_norm(in[0], in[1], in[2], f64);
  };
  auto to_f64 = [](const Tensor& t) { return cast_or_undefined(t, at::kDouble); };
  return autograd_grads(forward, {to_f64(x), to_f64(w), to_f64(b)}, gy.to(at::kDouble));
}

void expect_grads_close(const std::vector<Tensor>& actual, const std::vector<Tensor>& expected) {
  const char* names[] = {"grad_x", "grad_weight", "grad_bias"};
  for (size_t i = 0; i < actual.size(); ++i) {
    SCOPED_TRACE(names[i]);
    ASSERT_EQ(actual[i].defined(), expected[i].defined());
    if (actual[i].defined()) {
      EXPECT_TRUE(all_close(actual[i], expected[i], tolerance_for(actual[i].scalar_type())));
    }
  }
}

TEST_F(SeededTest, NormBackwardMatchesAutogradFloat64) {
  for (const bool center : {true, false}) {
    for (const auto& shape : kShapes) {
      for (const Affine affine : kAffine) {
        SCOPED_TRACE(describe(center ? "layer_norm" : "rms_norm", "shape", at::IntArrayRef(shape),
                              "weight", affine.weight, "bias", affine.bias));
        const Tensor x = make_input(shape, at::kDouble);
        const auto [w, b] = make_params(shape.back(), affine, at::kDouble);
        const Tensor gy = at::randn_like(x);
        expect_grads_close(ffn_norm_grads(center, gy, x, w, b), aten_norm_grads(center, gy, x, w, b));
      }
    }
  }
}

// The float32 and half kernels (float32 math, one rounding) against the float64
// autograd reference on the same input values.
TEST_F(SeededTest, NormBackwardLowPrecisionMatchesAutograd) {
  struct Case {
    at::ScalarType x_dtype, param_dtype;
  };
  for (const Case c : {Case{at::kFloat, at::kFloat}, Case{at::kBFloat16, at::kBFloat16},
                       Case{at::kBFloat16, at::kFloat}, Case{at::kHalf, at::kFloat}}) {
    for (const bool center : {true, false}) {
      for (const auto& shape : {std::vector<int64_t>{5, 7}, {3, 4097}, {2, 3, 33}}) {
        SCOPED_TRACE(describe(center ? "layer_norm" : "rms_norm", "shape", at::IntArrayRef(shape),
                              c.x_dtype, c.param_dtype));
        const Tensor x = make_input(shape, c.x_dtype);
        const auto [w, b] = make_params(shape.back(), {true, true}, c.param_dtype);
        const Tensor gy = at::randn(shape, at::kDouble).to(c.x_dtype);
        const auto actual = ffn_norm_grads(center, gy, x, w, b);
        EXPECT_EQ(actual[0].scalar_type(), c.x_dtype);
        EXPECT_EQ(actual[1].scalar_type(), c.param_dtype);
        EXPECT_EQ(actual[2].scalar_type(), c.param_dtype);
        expect_grads_close(actual, aten_norm_grads(center, gy, x, w, b));
      }
    }
  }
}

// Central differences of sum(norm(x, w, b) * gy) through our own forward op.
TEST_F(SeededTest, NormBackwardMatchesFiniteDifferences) {
  constexpr double kStep = 1e-6;
  for (const bool center : {true, false}) {
    for (const auto& shape : {std::vector<int64_t>{3, 7}, {2, 2, 5}}) {
      SCOPED_TRACE(describe(center ? "layer_norm" : "rms_norm", "shape", at::IntArrayRef(shape)));
      const Tensor x = make_input(shape, at::kDouble);
      const auto [w, b] = make_params(shape.back(), {true, true}, at::kDouble);
      const Tensor gy = at::randn_like(x);
      auto loss = [&](const Tensor& xv, const Tensor& wv, const Tensor& bv) {
        const Tensor y = center ? ops::layer_norm(xv, wv, bv, kLayerNormEps)
                                : ops::rms_norm(xv, wv, bv, kRmsNormEps);
        return (y * gy).sum().item<double>();
      };
      const std::vector<Tensor> inputs = {x, w, b};
      const auto analytic = ffn_norm_grads(center, gy, x, w, b);
      for (size_t k = 0; k < inputs.size(); ++k) {
        Tensor numeric = at::empty_like(inputs[k]);
        for (int64_t i = 0; i < inputs[k].numel(); ++i) {
          std::vector<Tensor> plus = {x, w, b}, minus = {x, w, b};
          plus[k] = inputs[k].clone();
          minus[k] = inputs[k].clone();
          plus[k].view(-1)[i] += kStep;
          minus[k].view(-1)[i] -= kStep;
          numeric.view(-1)[i] =
              (loss(plus[0], plus[1], plus[2]) - loss(minus[0], minus[1], minus[2])) / (2 * kStep);
        }
        SCOPED_TRACE(describe("input", k));
        EXPECT_TRUE(all_close(analytic[k], numeric, {1e-6, 1e-7}));
      }
    }
  }
}

// Weight/bias gradients are per-chunk partial sums added in a fixed order: the
// same bits on every run and for any thread count.
TEST_F(SeededTest, NormParamGradsAreDeterministic) {
  const int saved_threads = at::get_num_threads();
  for (const auto dtype : {at::kFloat, at::kBFloat16}) {
    for (const bool center : {true, false}) {
      SCOPED_TRACE(describe(center ? "layer_norm" : "rms_norm", dtype));
      const Tensor x = make_input({1000, 257}, dtype);
      const auto [w, b] = make_params(257, {true, true}, at::kFloat);
      const Tensor gy = at::randn(x.sizes(), at::kDouble).to(dtype);
      std::vector<std::vector<Tensor>> runs;
      for (const int threads : {4, 4, 1}) {
        at::set_num_threads(threads);
        runs.push_back(ffn_norm_grads(center, gy, x, w, b));
      }
      at::set_num_threads(saved_threads);
      for (size_t run = 1; run < runs.size(); ++run) {
        for (size_t k = 0; k < 3; ++k) {
          EXPECT_TRUE(at::equal(runs[0][k], runs[run][k])) << "run " << run << " gradient " << k;
        }
      }
    }
  }
}

}  // namespace
}  // namespace ffn::testing
