// The CUDA norm kernels (csrc/cuda/norm.cu), emulated, against the CPU kernels:
// forward and backward in every row policy of the launchers, on shapes at the
// policy boundaries and with row tails, every dtype, with and without affine
// parameters, float32 parameters for 16-bit inputs, misaligned inputs; and the
// options: a weight offset (zero-centered gamma) and the fused residual add
// (forward: s written as x is loaded; backward: grad_s added to grad_x).
#include "emu_testing.h"
#include "runtime.cuh"

namespace ffn::testing {
namespace {

struct Case {
  at::ScalarType dtype;
  int64_t rows, d;
  const char* policy;  // what the launchers pick for it (norm.cu)
};

// 128-bit words per row: d / 8 for 16-bit types, d / 4 for float32, d / 2 for
// float64; the policy row_plan (norm.cu) gives each shape.
const std::vector<Case> kForwardCases = {
    {at::kBFloat16, 5, 1, "1 thread per row, 1 word, a 1-element word"},
    {at::kHalf, 67, 24, "4 threads per row, 1 word, 64 rows per block: one partial block"},
    {at::kFloat, 300, 100, "16 threads per row, 2 words"},
    {at::kBFloat16, 3, 513, "64 threads per row, 2 words, a 1-element last word"},
    {at::kDouble, 9, 130, "64 threads per row, 2 words (float64)"},
    {at::kFloat, 6, 1024, "64 threads per row, 4 words: weight and bias from L1"},
    {at::kBFloat16, 4, 3000, "64 threads per row, 8 words, tail"},
    {at::kBFloat16, 4, 4096, "128 threads per row, 4 words"},
    {at::kFloat, 3, 4100, "256 threads per row, 8 words, tail"},
    {at::kBFloat16, 2, 16384, "256 threads per row, 8 words: the longest register row"},
    {at::kHalf, 3, 16392, "long row, cached in shared memory"},
    {at::kDouble, 3, 4101, "long row (float64), cached, tail"},
    {at::kFloat, 2, 60000, "long row too long for shared memory: re-read"},
    {at::kFloat, 0, 64, "no rows"},
};

const std::vector<Case> kBackwardCases = {
    {at::kBFloat16, 5, 1, "1 thread per row, 1 word"},
    {at::kHalf, 300, 24, "4 threads per row, 64 rows per block: block partials"},
    {at::kFloat, 67, 100, "16 threads per row, 2 words, many row groups per block"},
    {at::kBFloat16, 3, 513, "64 threads per row, 2 words, tail"},
    {at::kDouble, 4, 130, "64 threads per row, 2 words (float64)"},
    {at::kFloat, 5, 2048, "64 threads per row, 8 words"},
    {at::kBFloat16, 3, 8192, "256 threads per row, 4 words: the longest 16-bit register row"},
    {at::kDouble, 2, 4096, "256 threads per row, 8 words (float64)"},
    {at::kFloat, 5, 8193, "2049 words: long row, accumulators and rows in shared memory"},
    {at::kBFloat16, 3, 8200, "long row, cached"},
    {at::kFloat, 3, 20000, "long row: shared accumulators, rows re-read"},
    {at::kFloat, 3, 30000, "long row: accumulators too big, column kernel for dw/db"},
    {at::kFloat, 0, 64, "no rows: zero parameter gradients"},
};

struct Affine {
  bool weight, bias;
};

struct Options {
  double weight_offset = 0;
  bool fused_add = false;
};

Tensor input(const Case& c) { return (at::randn({c.rows, c.d}, at::kDouble) * 2 + 1.5).to(c.dtype); }

Tensor param(bool present, int64_t d, at::ScalarType dtype, double shift) {
  return present ? (at::randn({d}, at::kDouble) + shift).to(dtype) : Tensor();
}

// The parameter dtypes a case runs with: its own, and float32 for 16-bit x.
std::vector<at::ScalarType> param_dtypes(at::ScalarType dtype) {
  if (dtype == at::kBFloat16 || dtype == at::kHalf) return {dtype, at::kFloat};
  return {dtype};
}

void check_forward(const Case& c, bool center, Affine affine, at::ScalarType pdtype,
                   bool misaligned, Options options = {}) {
  SCOPED_TRACE(describe(c.policy, "| rows", c.rows, "d", c.d, c.dtype, center ? "layer_norm" : "rms_norm",
                        "weight", affine.weight, "bias", affine.bias, "params", pdtype,
                        misaligned ? "misaligned" : "", "weight_offset", options.weight_offset,
                        options.fused_add ? "fused add" : ""));
  Tensor x = input(c);
  Tensor residual = options.fused_add ? input(c) : Tensor();
  if (misaligned) {
    x = misaligned_copy(x);
    if (residual.defined()) residual = misaligned_copy(residual);
  }
  const Tensor w = param(affine.weight, c.d, pdtype, 1.0), b = param(affine.bias, c.d, pdtype, 0.0);
  const double eps = 1e-5, offset = options.weight_offset;
  if (options.fused_add) {
    Tensor y, s, y_ref, s_ref, rstd, rstd_ref;
    if (center) {
      Tensor mean, mean_ref;
      std::tie(y, s, mean, rstd) =
          call_body(add_layer_norm_fwd<cuda::kNormKernels>, x, residual, opt(w), opt(b), eps, offset, false);
      std::tie(y_ref, s_ref, mean_ref, rstd_ref) =
          call_body(add_layer_norm_fwd<cpu::kNormKernels>, x, residual, opt(w), opt(b), eps, offset, false);
      EXPECT_TRUE(matches(mean, mean_ref, compute_dtype(c.dtype))) << "mean";
    } else {
      std::tie(y, s, rstd) =
          call_body(add_rms_norm_fwd<cuda::kNormKernels>, x, residual, opt(w), opt(b), eps, offset, false);
      std::tie(y_ref, s_ref, rstd_ref) =
          call_body(add_rms_norm_fwd<cpu::kNormKernels>, x, residual, opt(w), opt(b), eps, offset, false);
    }
    EXPECT_TRUE(at::equal(s, x + residual)) << "s is x + residual rounded to x's dtype";
    EXPECT_TRUE(at::equal(s, s_ref)) << "s";
    EXPECT_TRUE(matches(y, y_ref, c.dtype)) << "y";
    EXPECT_TRUE(matches(rstd, rstd_ref, compute_dtype(c.dtype))) << "rstd";
  } else if (center) {
    const auto [y, mean, rstd] = call_body(layer_norm_fwd<cuda::kNormKernels>, x, opt(w), opt(b), eps, offset, false);
    const auto [y_ref, mean_ref, rstd_ref] =
        call_body(layer_norm_fwd<cpu::kNormKernels>, x, opt(w), opt(b), eps, offset, false);
    EXPECT_TRUE(matches(y, y_ref, c.dtype)) << "y";
    EXPECT_TRUE(matches(mean, mean_ref, compute_dtype(c.dtype))) << "mean";
    EXPECT_TRUE(matches(rstd, rstd_ref, compute_dtype(c.dtype))) << "rstd";
  } else {
    const auto [y, rstd] = call_body(rms_norm_fwd<cuda::kNormKernels>, x, opt(w), opt(b), eps, offset, false);
    const auto [y_ref, rstd_ref] =
        call_body(rms_norm_fwd<cpu::kNormKernels>, x, opt(w), opt(b), eps, offset, false);
    EXPECT_TRUE(matches(y, y_ref, c.dtype)) << "y";
    EXPECT_TRUE(matches(rstd, rstd_ref, compute_dtype(c.dtype))) << "rstd";
  }
}

void check_backward(const Case& c, bool center, Affine affine, at::ScalarType pdtype,
                    bool misaligned, Options options = {}) {
  SCOPED_TRACE(describe(c.policy, "| rows", c.rows, "d", c.d, c.dtype, center ? "layer_norm" : "rms_norm",
                        "weight", affine.weight, "bias", affine.bias, "params", pdtype,
                        misaligned ? "misaligned" : "", "weight_offset", options.weight_offset,
                        options.fused_add ? "fused add" : ""));
  Tensor x = input(c);
  Tensor dy = at::randn({c.rows, c.d}, at::kDouble).to(c.dtype);
  Tensor ds = options.fused_add ? at::randn({c.rows, c.d}, at::kDouble).to(c.dtype) : Tensor();
  if (misaligned) {
    x = misaligned_copy(x);
    dy = misaligned_copy(dy);
    if (ds.defined()) ds = misaligned_copy(ds);
  }
  const Tensor w = param(affine.weight, c.d, pdtype, 1.0), b = param(affine.bias, c.d, pdtype, 0.0);
  const double eps = 1e-5, offset = options.weight_offset;
  std::tuple<Tensor, Tensor, Tensor> got, want;
  if (center) {
    // Statistics from the CPU kernel: both backward passes see the same inputs.
    const auto [y, mean, rstd] =
        call_body(layer_norm_fwd<cpu::kNormKernels>, x, opt(w), opt(b), eps, offset, false);
    got = call_body(layer_norm_bwd<cuda::kNormKernels>, dy, x, mean, rstd, opt(w), opt(b), affine.weight,
                    affine.bias, offset,
                              opt(ds));
    want = call_body(layer_norm_bwd<cpu::kNormKernels>, dy, x, mean, rstd, opt(w), opt(b), affine.weight,
                     affine.bias, offset,
                               opt(ds));
  } else {
    const auto [y, rstd] = call_body(rms_norm_fwd<cpu::kNormKernels>, x, opt(w), opt(b), eps, offset, false);
    got = call_body(rms_norm_bwd<cuda::kNormKernels>, dy, x, rstd, opt(w), opt(b), affine.weight,
                    affine.bias, offset, opt(ds));
    want = call_body(rms_norm_bwd<cpu::kNormKernels>, dy, x, rstd, opt(w), opt(b), affine.weight,
                     affine.bias, offset, opt(ds));
  }
  EXPECT_TRUE(matches(std::get<0>(got), std::get<0>(want), c.dtype)) << "grad_x";
  // Parameter gradients: float32 sums over the rows (float64 for float64).
  EXPECT_TRUE(matches(std::get<1>(got), std::get<1>(want), pdtype)) << "grad_weight";
  EXPECT_TRUE(matches(std::get<2>(got), std::get<2>(want), pdtype)) << "grad_bias";
}

const std::vector<Affine> kAffine = {{true, true}, {true, false}, {false, true}, {false, false}};

TEST_F(SeededTest, EmulatedNormForwardMatchesCpu) {
  for (const Case& c : kForwardCases) {
    for (const bool center : {true, false}) {
      for (const Affine affine : kAffine) {
        for (const at::ScalarType pdtype : param_dtypes(c.dtype)) {
          if (!affine.weight && !affine.bias && pdtype != c.dtype) continue;
          check_forward(c, center, affine, pdtype, /*misaligned=*/false);
        }
      }
    }
  }
}

TEST_F(SeededTest, EmulatedNormBackwardMatchesCpu) {
  for (const Case& c : kBackwardCases) {
    for (const bool center : {true, false}) {
      for (const Affine affine : kAffine) {
        for (const at::ScalarType pdtype : param_dtypes(c.dtype)) {
          if (!affine.weight && !affine.bias && pdtype != c.dtype) continue;
          check_backward(c, center, affine, pdtype, /*misaligned=*/false);
        }
      }
    }
  }
}

// Zero-centered gamma and the fused residual add in every row policy: the
// weight offset in registers and from L1, s stored by the register kernels'
// prefetching loads and by the long-row kernels (re-read from s when the row is
// not cached), grad_s added by every backward kernel.
TEST_F(SeededTest, EmulatedNormOptionsMatchCpu) {
  const std::vector<Options> options = {{1.0, false}, {0.0, true}, {1.0, true}};
  for (const Options o : options) {
    for (const Case& c : kForwardCases) {
      for (const bool center : {true, false}) {
        for (const at::ScalarType pdtype : param_dtypes(c.dtype)) {
          check_forward(c, center, {true, true}, pdtype, /*misaligned=*/false, o);
        }
      }
    }
    for (const Case& c : kBackwardCases) {
      for (const bool center : {true, false}) {
        for (const at::ScalarType pdtype : param_dtypes(c.dtype)) {
          check_backward(c, center, {true, false}, pdtype, /*misaligned=*/false, o);
        }
      }
    }
  }
  for (const bool center : {true, false}) {
    check_forward({at::kBFloat16, 7, 1024, "misaligned"}, center, {true, true}, at::kBFloat16, true,
                  {1.0, true});
    check_backward({at::kBFloat16, 7, 1024, "misaligned"}, center, {true, true}, at::kBFloat16, true,
                   {1.0, true});
  }
}

// The in-place backward (grad_x written into grad_y) in every backward row policy,
// including the long rows whose parameter gradients the column kernel re-reads
// dy for: the same gradients as the CPU kernels' out-of-place backward.
TEST_F(SeededTest, EmulatedNormInPlaceBackwardMatchesCpu) {
  for (const Case& c : kBackwardCases) {
    for (const bool center : {true, false}) {
      SCOPED_TRACE(describe(c.policy, "| rows", c.rows, "d", c.d, c.dtype, center ? "layer_norm" : "rms_norm"));
      const Tensor x = input(c);
      const Tensor dy = at::randn({c.rows, c.d}, at::kDouble).to(c.dtype);
      const Tensor ds = at::randn({c.rows, c.d}, at::kDouble).to(c.dtype);
      const Tensor w = param(true, c.d, c.dtype, 1.0), b = param(true, c.d, c.dtype, 0.0);
      Tensor grad = dy.clone();
      std::tuple<Tensor, Tensor, Tensor> want;
      std::tuple<Tensor, Tensor> got;
      if (center) {
        const auto [y, mean, rstd] = call_body(layer_norm_fwd<cpu::kNormKernels>, x, w, b, 1e-5, 1.0, false);
        want = call_body(layer_norm_bwd<cpu::kNormKernels>, dy, x, mean, rstd, w, b, true, true, 1.0, ds);
        got = call_body(layer_norm_bwd_<cuda::kNormKernels>, grad, x, mean, rstd, w, b, true, true, 1.0, ds);
      } else {
        const auto [y, rstd] = call_body(rms_norm_fwd<cpu::kNormKernels>, x, w, b, 1e-5, 1.0, false);
        want = call_body(rms_norm_bwd<cpu::kNormKernels>, dy, x, rstd, w, b, true, true, 1.0, ds);
        got = call_body(rms_norm_bwd_<cuda::kNormKernels>, grad, x, rstd, w, b, true, true, 1.0, ds);
      }
      EXPECT_TRUE(matches(grad, std::get<0>(want), c.dtype)) << "grad_x, written into grad_y";
      EXPECT_TRUE(matches(std::get<0>(got), std::get<1>(want), c.dtype)) << "grad_weight";
      EXPECT_TRUE(matches(std::get<1>(got), std::get<2>(want), c.dtype)) << "grad_bias";
    }
  }
}

// With one SM the grids are a single wave of a few blocks: every block strides
// over many rows (the forward's next-row prefetch, the backward's accumulation
// over row groups before its one partial row).
class OneSmTest : public SeededTest {
 protected:
  void SetUp() override {
    SeededTest::SetUp();
    emu::set_sm_count(1);
  }
  void TearDown() override { emu::set_sm_count(emu::DeviceSpec{}.sm_count); }
};

TEST_F(OneSmTest, EmulatedNormStridingOverRowsMatchesCpu) {
  for (const Case& c : {Case{at::kHalf, 1000, 24, "4 threads per row, 64 rows per block"},
                        Case{at::kBFloat16, 37, 4096, "128 threads per row"},
                        Case{at::kFloat, 21, 1000, "warps per row"},
                        Case{at::kBFloat16, 9, 8200, "long rows"}}) {
    for (const bool center : {true, false}) {
      check_forward(c, center, {true, true}, c.dtype, /*misaligned=*/false);
      check_backward(c, center, {true, true}, c.dtype, /*misaligned=*/false);
      check_forward(c, center, {true, true}, c.dtype, /*misaligned=*/false, {1.0, true});
      check_backward(c, center, {true, true}, c.dtype, /*misaligned=*/false, {1.0, true});
    }
  }
}

// Pointers off 16-byte alignment take the element-wise loads and stores.
TEST_F(SeededTest, EmulatedNormMisalignedMatchesCpu) {
  for (const Case& c : {Case{at::kBFloat16, 7, 1024, "misaligned, warps per row"},
                        Case{at::kFloat, 3, 9000, "misaligned long row"},
                        Case{at::kHalf, 33, 64, "misaligned, sub-warp rows"}}) {
    for (const bool center : {true, false}) {
      check_forward(c, center, {true, true}, c.dtype, /*misaligned=*/true);
      check_backward(c, center, {true, true}, c.dtype, /*misaligned=*/true);
    }
  }
}

}  // namespace
}  // namespace ffn::testing
