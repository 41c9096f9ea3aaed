// The CPU vector layer's own math (csrc/cpu/vec.h): the float exp and tanh written out inline from
// Sleef's, against Sleef's.
#include "cpu/vec.h"

#include <gtest/gtest.h>

#include <bit>
#include <cstdint>
#include <initializer_list>

#if defined(CPU_CAPABILITY_AVX2)
extern "C" {  // libtorch_cpu's, what ATen's Vectorized<float>::exp and ::tanh call
__m256 Sleef_expf8_u10(__m256);
__m256 Sleef_tanhf8_u10(__m256);
}
#endif

namespace ffn::cpu {
namespace {

#if defined(CPU_CAPABILITY_AVX2)
// Lanes where ours and Sleef's results differ in any bit, over every 61st float bit pattern (NaNs
// and their payloads included) and the 4096 patterns around each of the edges, packed 8 by 8.
// (Run over all 2^32 patterns when written: no difference; that takes minutes in this test build.)
template <typename Ours, typename Theirs>
void expect_same_bits(const Ours& ours, const Theirs& sleef, std::initializer_list<float> edges) {
  uint64_t mismatches = 0;
  uint32_t first = 0;
  const auto compare = [&](const Int8& bits) {
    const Float8 x = std::bit_cast<Float8>(bits);
    const Int8 a = std::bit_cast<Int8>(ours(x));
    const Int8 b = std::bit_cast<Int8>(Float8(sleef(x)));
    for (int j = 0; j < 8; ++j) {
      if (a[j] != b[j] && mismatches++ == 0) first = static_cast<uint32_t>(bits[j]);
    }
  };
  Int8 bits;
  int filled = 0;
  const auto add = [&](uint32_t pattern) {
    bits[filled++] = static_cast<int32_t>(pattern);
    if (filled == 8) compare(bits), filled = 0;
  };
  for (uint64_t pattern = 0; pattern < (uint64_t{1} << 32); pattern += 61) {
    add(static_cast<uint32_t>(pattern));
  }
  for (const float edge : edges) {
    for (const float sign : {1.0f, -1.0f}) {
      const uint32_t center = std::bit_cast<uint32_t>(sign * edge);
      for (uint32_t step = 0; step < 4096; ++step) add(center + step - 2048);
    }
  }
  EXPECT_EQ(mismatches, 0u) << "first at float bits 0x" << std::hex << first;
}

TEST(SleefExp, SameBitsAsSleef) {
  // Around 0, the cut-offs to 0 (-104) and +inf (100), e^x's own limits (-103.97, 88.72) and where
  // its results turn subnormal (-87.34).
  expect_same_bits([](const Float8& x) { return exp_lanes(x); }, Sleef_expf8_u10,
                   {0.0f, -104.0f, 100.0f, -103.972084f, 88.7228394f, -87.3365479f});
}

TEST(SleefTanh, SameBitsAsSleef) {
  // Around 0, the cut-off to +-1 (8.664339742), and where e^|x|'s q = round(|x| log2 e) steps
  // (0.5 ln 2, 1.5 ln 2, 11.5 ln 2 = 7.97).
  expect_same_bits([](const Float8& x) { return tanh_lanes(x); }, Sleef_tanhf8_u10,
                   {0.0f, 8.664339742f, 0.34657359f, 1.03972077f, 7.97119258f});
}
#endif

}  // namespace
}  // namespace ffn::cpu
