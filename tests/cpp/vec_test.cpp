// The CPU vector layer's own math (csrc/cpu/vec.h): the float exp and tanh written out inline from
// Sleef's, against Sleef's; the bfloat16 loads, stores and rounding against c10's scalar BFloat16.
#include "cpu/vec.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <vector>

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

// The bfloat16 bits ATen's vector code rounds x to: c10's scalar rounding (nearest, ties to
// even), but 0xffff for every NaN (the scalar type gives 0x7fc0).
uint16_t expected_bfloat16(float x) {
  return std::isnan(x) ? uint16_t{0xffff} : torch::headeronly::detail::round_to_nearest_even(x);
}

// Every 13th float bit pattern and the 4096 around each rounding edge (halfway between two
// bfloat16 values, odd and even, the largest finite one and the infinities), a step (16 values)
// at a time: store() and round_to() against the scalar rounding.
TEST(BFloat16Vector, StoreAndRoundToAsATen) {
  uint64_t mismatches = 0;
  uint32_t first = 0;
  alignas(32) float values[kStep<BFloat16>];
  int filled = 0;
  const auto check = [&] {
    Pack<BFloat16> v;
    std::memcpy(v.reg, values, sizeof(values));
    BFloat16 stored[kStep<BFloat16>];
    store<BFloat16>(stored, v);
    const Pack<BFloat16> rounded = round_to<BFloat16>(v);
    float rounded_values[kStep<BFloat16>];
    std::memcpy(rounded_values, rounded.reg, sizeof(rounded_values));
    for (int j = 0; j < kStep<BFloat16>; ++j) {
      const uint16_t want = expected_bfloat16(values[j]);
      const bool round_ok = std::isnan(values[j])
                                ? std::isnan(rounded_values[j])
                                : std::bit_cast<uint32_t>(rounded_values[j]) == uint32_t{want} << 16;
      if ((stored[j].x != want || !round_ok) && mismatches++ == 0) first = std::bit_cast<uint32_t>(values[j]);
    }
  };
  const auto add = [&](uint32_t pattern) {
    values[filled++] = std::bit_cast<float>(pattern);
    if (filled == kStep<BFloat16>) check(), filled = 0;
  };
  for (uint64_t pattern = 0; pattern < (uint64_t{1} << 32); pattern += 13) add(static_cast<uint32_t>(pattern));
  for (const uint32_t edge : {0x3f808000u, 0x3f818000u, 0x7f7f8000u, 0x7f800000u, 0x00008000u}) {
    for (const uint32_t sign : {0u, 0x80000000u}) {
      for (uint32_t step = 0; step < 4096; ++step) add((edge | sign) + step - 2048);
    }
  }
  EXPECT_EQ(mismatches, 0u) << "first at float bits 0x" << std::hex << first;
}

// Every bfloat16 bit pattern loads as c10's float of it, in lane order; a partial load zeroes the
// lanes past its count, and a partial store writes only its count.
TEST(BFloat16Vector, LoadsAndPartialSteps) {
  std::vector<BFloat16> all(65536);
  for (uint32_t bits = 0; bits < 65536; ++bits) all[bits] = BFloat16(static_cast<uint16_t>(bits), BFloat16::from_bits());
  for (size_t i = 0; i < all.size(); i += kStep<BFloat16>) {
    const Pack<BFloat16> v = load<BFloat16>(all.data() + i);
    float lanes[kStep<BFloat16>];
    std::memcpy(lanes, v.reg, sizeof(lanes));
    for (int j = 0; j < kStep<BFloat16>; ++j) {
      ASSERT_EQ(std::bit_cast<uint32_t>(lanes[j]), std::bit_cast<uint32_t>(static_cast<float>(all[i + j])))
          << "bfloat16 bits 0x" << std::hex << i + j;
    }
  }
  for (int count = 0; count <= kStep<BFloat16>; ++count) {
    const Pack<BFloat16> v = load<BFloat16>(all.data() + 0x3f80, count);  // 1.0, 1.0078125, ...
    float lanes[kStep<BFloat16>];
    std::memcpy(lanes, v.reg, sizeof(lanes));
    BFloat16 out[kStep<BFloat16> + 1];
    for (BFloat16& o : out) o = BFloat16(-7.0f);
    store<BFloat16>(out, v, count);
    for (int j = 0; j < kStep<BFloat16>; ++j) {
      EXPECT_EQ(lanes[j], j < count ? static_cast<float>(all[0x3f80 + j]) : 0.0f) << "count " << count << ", lane " << j;
      EXPECT_EQ(out[j].x, j < count ? all[0x3f80 + j].x : BFloat16(-7.0f).x) << "count " << count << ", lane " << j;
    }
    EXPECT_EQ(out[kStep<BFloat16>].x, BFloat16(-7.0f).x);
  }
}

}  // namespace
}  // namespace ffn::cpu
