// The CPU vector layer's own math (csrc/cpu/vec.h): the float exp written out inline from Sleef's,
// against Sleef's.
#include "cpu/vec.h"

#include <gtest/gtest.h>

#include <bit>
#include <cstdint>

#if defined(CPU_CAPABILITY_AVX2)
extern "C" __m256 Sleef_expf8_u10(__m256);  // libtorch_cpu's, what ATen's Vectorized<float>::exp calls
#endif

namespace ffn::cpu {
namespace {

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
  for (uint64_t pattern = 0; pattern < (uint64_t{1} << 32); pattern += 61) {
    add(static_cast<uint32_t>(pattern));
  }
  // Around 0, the cut-offs to 0 (-104) and +inf (100), e^x's own limits (-103.97, 88.72) and where
  // its results turn subnormal (-87.34).
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
