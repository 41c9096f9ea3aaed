// The CPU vector layer's own math (csrc/cpu/vec.h) where it is not ATen's: the inline float exp
// the erf takes, against double precision over every float.
#include "cpu/vec.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

namespace ffn::cpu {
namespace {

// |got - e^x| in units of the float spacing at e^x (subnormal spacing below FLT_MIN).
double ulp_error(float got, double exact) {
  const double spacing = exact < std::numeric_limits<float>::min()
                             ? std::numeric_limits<float>::denorm_min()
                             : std::ldexp(1.0, std::ilogb(exact) - 23);
  return std::fabs(got - exact) / spacing;
}

Float8 lanes_of(const float (&values)[8]) {
  Float8 v;
  for (int j = 0; j < 8; ++j) v[j] = values[j];
  return v;
}

TEST(InlineExp, Within1Point26UlpOfExpOverTheFloats) {
  // Every 113th float of either sign up to 104 in magnitude, 8 of them per call.
  double worst = 0;
  float worst_x = 0;
  float batch[8];
  int filled = 0;
  const auto check = [&] {
    const Float8 out = inline_exp_lanes(lanes_of(batch));
    for (int j = 0; j < 8; ++j) {
      const double exact = std::exp(static_cast<double>(batch[j]));
      if (exact > std::numeric_limits<float>::max()) {
        EXPECT_EQ(out[j], std::numeric_limits<float>::infinity()) << "x = " << batch[j];
        continue;
      }
      const double error = ulp_error(out[j], exact);
      if (error > worst) worst = error, worst_x = batch[j];
    }
    filled = 0;
  };
  for (uint32_t bits = 0; bits < std::bit_cast<uint32_t>(104.0f); bits += 113) {
    for (float sign : {1.0f, -1.0f}) {
      batch[filled++] = sign * std::bit_cast<float>(bits);
      if (filled == 8) check();
    }
  }
  EXPECT_LE(worst, 1.26) << "at x = " << worst_x;
}

TEST(InlineExp, EdgesOfTheRange) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const Float8 out = inline_exp_lanes(lanes_of({0.0f, -0.0f, kInf, -kInf, 88.8f, -104.0f, -87.5f, -100.0f}));
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], 1.0f);
  EXPECT_EQ(out[2], kInf);
  EXPECT_EQ(out[3], 0.0f);
  EXPECT_EQ(out[4], kInf);
  EXPECT_EQ(out[5], 0.0f);
  // Subnormal results keep their bits: e^-87.5 and e^-100 within one subnormal step.
  EXPECT_LE(ulp_error(out[6], std::exp(-87.5)), 1.0);
  EXPECT_LE(ulp_error(out[7], std::exp(-100.0)), 1.0);
  EXPECT_GT(out[7], 0.0f);
  const Float8 nan = inline_exp_lanes(lanes_of({NAN, -NAN, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f}));
  EXPECT_TRUE(std::isnan(nan[0]));
  EXPECT_TRUE(std::isnan(nan[1]));
}

}  // namespace
}  // namespace ffn::cpu
