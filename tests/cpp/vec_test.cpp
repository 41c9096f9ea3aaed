// The CPU vector layer's own math (csrc/cpu/vec.h): the inline float exp the erf takes, against
// double precision over every float, and the float exp written out from Sleef's, against Sleef's.
#include "cpu/vec.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(CPU_CAPABILITY_AVX2)
extern "C" __m256 Sleef_expf8_u10(__m256);  // libtorch_cpu's, what ATen's Vectorized<float>::exp calls
#endif

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

#if defined(CPU_CAPABILITY_AVX2)
TEST(SleefExp, SameBitsAsSleef) {
  // Every 61st float bit pattern (NaNs and their payloads included), then the edges of the range
  // packed 8 by 8. (Run over all 2^32 patterns when written: no difference; that takes minutes in
  // this test build.)
  uint64_t mismatches = 0;
  uint32_t first = 0;
  const auto compare = [&](const Int8& bits) {
    const Float8 x = std::bit_cast<Float8>(bits);
    const Int8 ours = std::bit_cast<Int8>(exp_lanes(x));
    const Int8 sleef = std::bit_cast<Int8>(Float8(Sleef_expf8_u10(x)));
    for (int j = 0; j < 8; ++j) {
      if (ours[j] != sleef[j] && mismatches++ == 0) first = static_cast<uint32_t>(bits[j]);
    }
  };
  Int8 bits;
  int filled = 0;
  const auto add = [&](uint32_t pattern) {
    bits[filled++] = static_cast<int32_t>(pattern);
    if (filled == 8) compare(bits), filled = 0;
  };
  for (uint64_t pattern = 0; pattern < (uint64_t{1} << 32); pattern += 61) add(static_cast<uint32_t>(pattern));
  // Around 0, the underflow (-104) and overflow (100) cut-offs and e^x's own limits (-103.97, 88.72).
  for (const float edge : {0.0f, -104.0f, 100.0f, -103.972084f, 88.7228394f, -87.3365479f}) {
    for (const float sign : {1.0f, -1.0f}) {
      const uint32_t center = std::bit_cast<uint32_t>(sign * edge);
      for (uint32_t step = 0; step < 4096; ++step) add(center + step - 2048);
    }
  }
  EXPECT_EQ(mismatches, 0u) << "first at float bits 0x" << std::hex << first;
}
#endif

}  // namespace
}  // namespace ffn::cpu
