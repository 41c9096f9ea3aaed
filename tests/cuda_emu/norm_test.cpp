// The CUDA norm kernels (csrc/cuda/norm.cu), emulated, against the CPU kernels:
// forward and backward in every row policy of the launchers, on shapes at the
// policy boundaries and with row tails, every dtype, with and without affine
// parameters, float32 parameters for 16-bit inputs, misaligned inputs; and the
// options: a weight offset (zero-centered gamma) and the fused residual add
// (forward: s written as x is loaded; backward: grad_s added to grad_x). And
// the row plan override (FFN_NORM_FORWARD_PLAN / FFN_NORM_BACKWARD_PLAN): every
// plan scripts/norm_plan_sweep.py forces, at every blocks per SM the occupancy
// calculator allows, and the plans it refuses.
#include "emu_testing.h"
#include "runtime.cuh"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <utility>

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

// ---------------------------------------------------------------------------
// The row plan override. Each test runs in its own process (ctest), and the
// variables are set only in a ForcedPlan's scope.
constexpr const char* kForwardPlan = "FFN_NORM_FORWARD_PLAN";
constexpr const char* kBackwardPlan = "FFN_NORM_BACKWARD_PLAN";
constexpr int kRowBlock = 256;   // norm.cu's register kernels' block
constexpr int kMaxBlocksPerSm = 2048 / kRowBlock;  // threads per SM (sm_90) / block

class ForcedPlan {
 public:
  ForcedPlan(const char* variable, const std::string& plan) : variable_(variable) {
    setenv(variable, plan.c_str(), 1);
  }
  ~ForcedPlan() { unsetenv(variable_); }
  ForcedPlan(const ForcedPlan&) = delete;
  ForcedPlan& operator=(const ForcedPlan&) = delete;

 private:
  const char* variable_;
};

int64_t row_words(at::ScalarType dtype, int64_t d) {
  return (d * at::elementSize(dtype) + 15) / 16;
}

// Words per thread instantiated (norm.cu's kMaxForwardWords, kMaxBackwardWords).
int max_words(bool backward, at::ScalarType dtype) {
  return backward && at::elementSize(dtype) == 2 ? 4 : 8;
}

// (threads per row, words per thread) of the plans scripts/norm_plan_sweep.py
// forces for a row of `words` (its plans(), without the blocks per SM): threads
// 1, 2, 4, ... 256 up to the first that gives each thread at most one word,
// each with the fewest instantiated words per thread that cover the row.
std::vector<std::pair<int, int>> sweep_plans(int64_t words, int max_words) {
  std::vector<std::pair<int, int>> out;
  for (int threads = 1; threads <= kRowBlock; threads *= 2) {
    int per_thread = 1;
    while (int64_t{threads} * per_thread < words) per_thread *= 2;
    if (per_thread <= max_words) out.emplace_back(threads, per_thread);
    if (threads >= words) break;
  }
  return out;
}

std::string plan_text(int threads, int per_thread, int blocks = 0) {
  return std::to_string(threads) + "x" + std::to_string(per_thread) +
         (blocks > 0 ? "@" + std::to_string(blocks) : "");
}

// Runs check with `plan` forced; false (and no failure) where the launcher
// refuses it for exceeding the occupancy calculator's blocks per SM.
template <typename Check>
bool runs_within_occupancy(const char* variable, const std::string& plan, const Check& check) {
  const ForcedPlan forced(variable, plan);
  try {
    check();
    return true;
  } catch (const std::runtime_error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("blocks per SM, but the occupancy calculator allows"), std::string::npos)
        << message;
    EXPECT_NE(message.find(std::string(variable) + "=" + plan), std::string::npos) << message;
    return false;
  }
}

// With one SM, the grid of a forced plan is its blocks per SM: rows enough for
// every block to stride over two or three row groups.
class ForcedPlanTest : public OneSmTest {
 protected:
  void SetUp() override {
    OneSmTest::SetUp();
    unsetenv(kForwardPlan);
    unsetenv(kBackwardPlan);
  }
};

// Every plan the sweep forces on its shapes (scripts/cuda_report.py's
// BENCH_SHAPES: d 1024 4096 8192 16384, bfloat16 and float32), at every blocks
// per SM from 1 up to the first the emulated occupancy calculator refuses
// (threads and shared memory bound it; a GPU's registers can only lower it, so
// this covers what a device runs), forward and backward, against the CPU kernels.
TEST_F(ForcedPlanTest, EmulatedNormSweepPlansMatchCpu) {
  int launched = 0;
  for (const at::ScalarType dtype : {at::kBFloat16, at::kFloat}) {
    for (const int64_t d : {1024, 4096, 8192, 16384}) {
      for (const bool backward : {false, true}) {
        for (const auto [threads, per_thread] : sweep_plans(row_words(dtype, d), max_words(backward, dtype))) {
          const int rows_per_block = kRowBlock / threads;
          int blocks = 1;
          for (; blocks <= kMaxBlocksPerSm + 1; ++blocks) {
            const std::string plan = plan_text(threads, per_thread, blocks);
            // Every block a row group, and the first a partial second one.
            const Case c{dtype, blocks * rows_per_block + rows_per_block / 2 + 1, d, plan.c_str()};
            const bool ran = runs_within_occupancy(backward ? kBackwardPlan : kForwardPlan, plan, [&] {
              // LayerNorm (both reductions) at every blocks per SM, RMSNorm at one.
              for (const bool center : {true, false}) {
                if (!center && blocks > 1) continue;
                if (backward) {
                  check_backward(c, center, {true, true}, dtype, /*misaligned=*/false);
                } else {
                  check_forward(c, center, {true, true}, dtype, /*misaligned=*/false);
                }
              }
            });
            if (!ran) break;
            ++launched;
          }
          EXPECT_GT(blocks, 1) << plan_text(threads, per_thread) << ": not even 1 block per SM";
          EXPECT_LE(blocks, kMaxBlocksPerSm + 1) << plan_text(threads, per_thread)
                                                 << ": more blocks per SM than its threads allow";
        }
      }
    }
  }
  // 30 (threads, words) pairs at 1-8 blocks per SM, less 7-8 for the four
  // backward plans whose 32 KiB of shared accumulators fit 6 blocks on an SM.
  EXPECT_EQ(launched, 30 * 8 - 4 * 2);
}

// Every threads per row (1 to 256) with every instantiated words per thread of
// every dtype, forward and backward, on a row that needs them (the sweep's plan
// for it): whole 128-bit words (the vectorized kernels) and a tail element (the
// element-wise ones, one element short), threads left with fewer words than
// others. One block (@1, one SM) strides over three row groups, the last one
// partial.
TEST_F(ForcedPlanTest, EmulatedNormEveryForcedPlanShapeMatchesCpu) {
  for (const at::ScalarType dtype : {at::kBFloat16, at::kHalf, at::kFloat, at::kDouble}) {
    const int64_t V = 16 / at::elementSize(dtype);
    for (const bool backward : {false, true}) {
      for (int per_thread = 1; per_thread <= max_words(backward, dtype); per_thread *= 2) {
        for (int threads = 1; threads <= kRowBlock; threads *= 2) {
          // More than half of the words the plan holds: its words per thread are the fewest.
          const int64_t words = per_thread == 1 ? threads - threads / 4 : threads * per_thread - threads / 2;
          const auto swept = sweep_plans(words, max_words(backward, dtype));
          ASSERT_NE(std::find(swept.begin(), swept.end(), std::make_pair(threads, per_thread)), swept.end());
          for (const int64_t d : {words * V, words * V - 1}) {
            const std::string plan = plan_text(threads, per_thread, 1);
            const Case c{dtype, 2 * (kRowBlock / threads) + 1, d, plan.c_str()};
            const char* variable = backward ? kBackwardPlan : kForwardPlan;
            {
              const ForcedPlan forced(variable, plan);
              for (const bool center : {true, false}) {
                if (backward) {
                  check_backward(c, center, {true, true}, dtype, /*misaligned=*/false);
                } else {
                  check_forward(c, center, {true, true}, dtype, /*misaligned=*/false);
                }
              }
            }
            if (threads == 1) continue;
            // The variable is read for this row: half the threads cannot cover it.
            const ForcedPlan fewer(variable, plan_text(threads / 2, per_thread));
            const Tensor x = input(c);
            const Tensor rstd = at::ones({c.rows}, compute_dtype(dtype));
            if (backward) {
              EXPECT_ERROR_WITH(call_body(rms_norm_bwd<cuda::kNormKernels>, x, x, rstd, std::nullopt,
                                          std::nullopt, false, false, 0.0, std::nullopt),
                                "cover");
            } else {
              EXPECT_ERROR_WITH(call_body(rms_norm_fwd<cuda::kNormKernels>, x, std::nullopt,
                                          std::nullopt, 1e-6, 0.0, false),
                                "cover");
            }
          }
        }
      }
    }
  }
}

// Forcing the plan row_plan picks, at the occupancy calculator's blocks per SM
// (8 here for both kernels), gives the very bits of the automatic launch; an
// empty variable is unset.
TEST_F(ForcedPlanTest, EmulatedNormForcingTheAutomaticPlanChangesNothing) {
  const Tensor x = input({at::kBFloat16, 300, 1000, ""});
  const Tensor w = param(true, 1000, at::kBFloat16, 1.0), b = param(true, 1000, at::kBFloat16, 0.0);
  const Tensor dy = at::randn({300, 1000}, at::kDouble).to(at::kBFloat16);
  const auto run = [&] {
    const auto [y, mean, rstd] =
        call_body(layer_norm_fwd<cuda::kNormKernels>, x, w, b, 1e-5, 0.0, false);
    const auto [dx, dw, db] = call_body(layer_norm_bwd<cuda::kNormKernels>, dy, x, mean, rstd, w, b,
                                        true, true, 0.0, std::nullopt);
    return std::vector<Tensor>{y, mean, rstd, dx, dw, db};
  };
  const std::vector<Tensor> automatic = run();
  // d = 1000 bfloat16: 125 words; row_plan: 64 threads per row, 2 words per thread.
  for (const char* plan : {"64x2", "64x2@8", ""}) {
    SCOPED_TRACE(plan);
    const ForcedPlan forward(kForwardPlan, plan), backward(kBackwardPlan, plan);
    const std::vector<Tensor> forced = run();
    for (size_t i = 0; i < forced.size(); ++i) EXPECT_TRUE(at::equal(forced[i], automatic[i])) << i;
  }
  // A different plan sums in another order: close, not equal bits.
  const ForcedPlan forward(kForwardPlan, "128x1@2"), backward(kBackwardPlan, "256x1@3");
  const std::vector<Tensor> other = run();
  EXPECT_TRUE(matches(other[0], automatic[0], at::kBFloat16)) << "y";
  EXPECT_TRUE(matches(other[3], automatic[3], at::kBFloat16)) << "dx";
  EXPECT_TRUE(matches(other[4], automatic[4], at::kBFloat16)) << "dw";
}

// A plan the kernels cannot run is refused with the variable, the plan and why.
TEST_F(SeededTest, EmulatedNormRejectsPlansItCannotRun) {
  const auto forward = [](at::ScalarType dtype, int64_t d) {
    const Tensor x = at::randn({4, d}, at::kDouble).to(dtype);
    return call_body(rms_norm_fwd<cuda::kNormKernels>, x, std::nullopt, std::nullopt, 1e-6, 0.0, false);
  };
  const auto backward = [](at::ScalarType dtype, int64_t d) {
    const Tensor x = at::randn({4, d}, at::kDouble).to(dtype);
    const auto [y, rstd] =
        call_body(rms_norm_fwd<cpu::kNormKernels>, x, std::nullopt, std::nullopt, 1e-6, 0.0, false);
    return call_body(rms_norm_bwd<cuda::kNormKernels>, at::ones_like(x), x, rstd, std::nullopt,
                     std::nullopt, false, false, 0.0, std::nullopt);
  };
  struct Refused {
    bool backward;
    const char* plan;
    at::ScalarType dtype;
    int64_t d;
    const char* why;
  };
  const std::vector<Refused> refused = {
      {false, "64", at::kFloat, 1024, "expected FFN_NORM_FORWARD_PLAN to be THREADSxWORDS or "
                                             "THREADSxWORDS@BLOCKS"},
      {false, "64x4@", at::kFloat, 1024, "got '64x4@'"},
      {false, "64x4@2 ", at::kFloat, 1024, "got '64x4@2 '"},
      {false, "0x4", at::kFloat, 1024, "threads per row must be a power of two from 1 to 256, got 0"},
      {false, "48x8", at::kFloat, 1024, "FFN_NORM_FORWARD_PLAN=48x8: threads per row must be a power "
                                               "of two from 1 to 256, got 48"},
      {false, "512x1", at::kFloat, 1024, "got 512"},
      {false, "64x3", at::kFloat, 1024, "words per thread must be one of the instantiations for Float "
                                               "rows (1, 2, 4, 8), got 3"},
      {false, "16x16", at::kFloat, 1024, "got 16"},
      {true, "32x8", at::kBFloat16, 2048, "FFN_NORM_BACKWARD_PLAN=32x8: words per thread must be one "
                                                   "of the instantiations for BFloat16 rows (1, 2, 4), got 8"},
      {false, "32x4", at::kFloat, 1000, "FFN_NORM_FORWARD_PLAN=32x4: 32 threads x 4 words cover 128 "
                                               "128-bit words, but a row of d = 1000 Float elements takes 250"},
      {false, "256x8", at::kFloat, 8193, "but a row of d = 8193 Float elements takes 2049"},
      {true, "256x4", at::kBFloat16, 8200, "a row of d = 8200 BFloat16 elements takes 1025"},
      {false, "64x4@0", at::kFloat, 1024, "blocks per SM must be at least 1, got 0"},
      {false, "64x4@-1", at::kFloat, 1024, "got -1"},
      {false, "64x4@9", at::kFloat, 1024, "FFN_NORM_FORWARD_PLAN=64x4@9: 9 blocks per SM, but the "
                                                 "occupancy calculator allows 8 of this kernel (256 threads, 0 "
                                                 "bytes of dynamic shared memory) on this device"},
  };
  for (const Refused& r : refused) {
    SCOPED_TRACE(describe(r.backward ? "backward" : "forward", r.plan, r.dtype, r.d));
    const ForcedPlan forced(r.backward ? kBackwardPlan : kForwardPlan, r.plan);
    // The other pass does not read the variable.
    if (r.backward) {
      EXPECT_ERROR_WITH(backward(r.dtype, r.d), r.why);
      EXPECT_NO_THROW(forward(r.dtype, r.d));
    } else {
      EXPECT_ERROR_WITH(forward(r.dtype, r.d), r.why);
      EXPECT_NO_THROW(backward(r.dtype, r.d));
    }
  }
}

}  // namespace
}  // namespace ffn::testing
