// Vectorized load/store and lane math for the CPU kernels, written once for every dtype.
//
// ATen's Vectorized<T> is not part of the stable ABI, so this is the project's own,
// small vector layer: 256-bit GCC vector types (Lanes<A>: 8 floats or 4 doubles)
// that the plain operators (+ - * / < <=) act on lane by lane, plus the few lane
// functions the kernels need. With CPU_CAPABILITY_AVX2 (-mavx2 -mfma -mf16c) these
// are AVX2/FMA/F16C instructions and the same Sleef functions ATen's AVX2 kernels
// call (the float exp and tanh written out inline, Sleef's to the bit); without it, the same
// code with scalar std:: math per lane.
//
// A row loop steps over kStep<T> = 256 bits of T at a time and does its math in
// T's accumulation type (float for half types, else T): the step is held as a
// Pack<T> of kRegs registers (two float registers per bfloat16/half step, one
// otherwise), so half types are converted once on load and once on store and never
// round in between. The step widths, the reduction orders and the FMAs are
// ATen's AVX2 ones, so results are bit for bit those of ATen's Vectorized kernels
// (which NaN a NaN result is aside: the compiler may swap the operands of + and *).
//
// The helpers are forced inline (and so are the kernels' per-step lambdas, with
// C10_ALWAYS_INLINE_ATTRIBUTE): they run once per vector step of every row loop,
// and GCC otherwise stops inlining them once a kernel grows, which costs an
// out-of-line call per step and sends every vector through memory.
#pragma once

#include "tensor.h"

#include <torch/headeronly/macros/Macros.h>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(CPU_CAPABILITY_AVX2)
// Sleef's vector exp/erf/tanh, the functions ATen's Vectorized<float/double> call:
// libtorch_cpu.so (linked anyway, for the stable C shim) exports them as C symbols.
// (The float exp and tanh are written out inline below: exp_lanes, tanh_lanes.)
extern "C" {
__m256d Sleef_expd4_u10(__m256d);
__m256d Sleef_erfd4_u10(__m256d);
__m256d Sleef_tanhd4_u10(__m256d);
}
#endif

namespace ffn::cpu {

using Float8 = float __attribute__((vector_size(32)));
using Double4 = double __attribute__((vector_size(32)));
using Int8 = int32_t __attribute__((vector_size(32)));
using Long4 = int64_t __attribute__((vector_size(32)));
using Uint32x8 = uint32_t __attribute__((vector_size(32)));
using Bits16x8 = uint16_t __attribute__((vector_size(16)));  // 8 half/bfloat16 values
using Bits16x16 = uint16_t __attribute__((vector_size(32)));  // a step of half/bfloat16 values

// One register of A (float or double), the integer of A's width, and the integer
// vector A's comparisons give (all bits set in a lane where true).
template <typename A>
using Lanes = std::conditional_t<std::is_same_v<A, double>, Double4, Float8>;
template <typename A>
using LaneInt = std::conditional_t<std::is_same_v<A, double>, int64_t, int32_t>;
template <typename A>
using LaneMask = std::conditional_t<std::is_same_v<A, double>, Long4, Int8>;
template <typename A>
inline constexpr int kLanes = static_cast<int>(32 / sizeof(A));

template <typename T>
using acc_t = acc_type<T>;
template <typename T>
inline constexpr int64_t kStep = 32 / sizeof(T);

// --- one register -------------------------------------------------------------------

template <typename A>
C10_ALWAYS_INLINE Lanes<A> splat(A value) {
  Lanes<A> v;
  for (int j = 0; j < kLanes<A>; ++j) v[j] = value;
  return v;
}

// Lane j is `j` (for masking lanes by position).
template <typename A>
C10_ALWAYS_INLINE LaneMask<A> lane_index() {
  LaneMask<A> index;
  for (int j = 0; j < kLanes<A>; ++j) index[j] = j;
  return index;
}

// Lanes [0, n) of p; the others are zero.
template <typename A>
C10_ALWAYS_INLINE Lanes<A> load_lanes(const A* p, int64_t n) {
  Lanes<A> v{};
  std::memcpy(&v, p, std::clamp<int64_t>(n, 0, kLanes<A>) * sizeof(A));
  return v;
}

template <typename A>
C10_ALWAYS_INLINE void store_lanes(A* p, const Lanes<A>& v, int64_t n) {
  std::memcpy(p, &v, std::clamp<int64_t>(n, 0, kLanes<A>) * sizeof(A));
}

// a * b + c, rounded once where the hardware has FMA.
template <typename V>
C10_ALWAYS_INLINE V fmadd_lanes(const V& a, const V& b, const V& c) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<V, Double4>) {
    return _mm256_fmadd_pd(a, b, c);
  } else {
    return _mm256_fmadd_ps(a, b, c);
  }
#else
  return a * b + c;
#endif
}

// IEEE 754-2019 maximum: NaN if either side is NaN (as ATen's, and torch.relu).
template <typename V>
C10_ALWAYS_INLINE V maximum_lanes(const V& a, const V& b) {
#if defined(CPU_CAPABILITY_AVX2)
  // vmaxps gives b when either side is NaN; the unordered mask (all ones) is a NaN.
  if constexpr (std::is_same_v<V, Double4>) {
    return _mm256_or_pd(_mm256_max_pd(a, b), _mm256_cmp_pd(a, b, _CMP_UNORD_Q));
  } else {
    return _mm256_or_ps(_mm256_max_ps(a, b), _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
  }
#else
  const auto unordered = (a != a) | (b != b);
  return unordered ? a + b : (a > b ? a : b);
#endif
}

// v exactly as computed, opaque to the optimizer: the multiply that produced v is not fused
// into a later add or subtract (FMA contraction, which GCC does with -mfma: C++ defaults to
// -ffp-contract=fast). (Without FMA there is no contraction.)
template <typename V>
C10_ALWAYS_INLINE V unfused_lanes(V v) {
#if defined(CPU_CAPABILITY_AVX2) && defined(__GNUC__)
  asm("" : "+x"(v));
#endif
  return v;
}

template <typename V, typename Fn>
C10_ALWAYS_INLINE V map_lanes(V v, const Fn& fn) {
  for (int j = 0; j < static_cast<int>(sizeof(V) / sizeof(v[0])); ++j) v[j] = fn(v[j]);
  return v;
}

#if defined(CPU_CAPABILITY_AVX2)
// Sleef's float exp range reduction, shared by exp_lanes and the tanh's exp_pair: x = q ln 2 + s with
// q = round(x log2 e) and -ln 2 in two parts (kNegLn2Hi + kNegLn2Lo), and 2^q applied as two
// factors 2^(q>>1) and 2^(q - (q>>1)), each a normal float where 2^q alone would not be.
inline constexpr float kLog2E = 0x1.715476p+0f, kNegLn2Hi = -0x1.62e4p-1f, kNegLn2Lo = -0x1.7f7d1cp-20f;

C10_ALWAYS_INLINE __m256i exp_exponent(__m256 x) {
  return _mm256_cvtps_epi32(_mm256_mul_ps(x, _mm256_set1_ps(kLog2E)));
}

C10_ALWAYS_INLINE std::pair<__m256, __m256> power_of_two_halves(__m256i q) {
  const auto power_of_two = [](__m256i k) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
  };
  const __m256i half_q = _mm256_srai_epi32(q, 1);
  return {power_of_two(half_q), power_of_two(_mm256_sub_epi32(q, half_q))};
}
#endif

// float exp, Sleef's expf8_u10 (the AVX2 build ATen's Vectorized<float>::exp calls) operation for
// operation and constant for constant, inline: the same bits for every float (all 2^32 patterns
// compared once; tests/cpp/vec_test.cpp compares a sample and the range's edges), without the
// call, around which every live vector register is spilled (the ABI saves none). 2^q * e^s with
// q = round(x log2 e), s = x - q ln 2 (ln 2 in two parts), e^s by a degree-7 polynomial, 2^q
// applied in two halves; 0 below -104, +inf above 100.
C10_ALWAYS_INLINE Float8 exp_lanes(const Float8& x) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256i q = exp_exponent(x);
  const __m256 q_float = _mm256_cvtepi32_ps(q);
  __m256 s = _mm256_fmadd_ps(q_float, _mm256_set1_ps(kNegLn2Hi), x);
  s = _mm256_fmadd_ps(q_float, _mm256_set1_ps(kNegLn2Lo), s);
  __m256 u = _mm256_fmadd_ps(_mm256_set1_ps(1.98527617612853646278381e-4f), s,
                             _mm256_set1_ps(1.39304355252534151077271e-3f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(8.33336077630519866943359e-3f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(4.16664853692054748535156e-2f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(1.66666671633720397949219e-1f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.5f));
  __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(s, s), u, s), _mm256_set1_ps(1.0f));
  const auto [scale_1, scale_2] = power_of_two_halves(q);
  y = _mm256_mul_ps(_mm256_mul_ps(y, scale_1), scale_2);
  y = _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-104.0f), _CMP_LT_OQ), y);
  return _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(_mm256_set1_ps(100.0f), x, _CMP_LT_OQ));
#else
  return map_lanes(x, [](float v) { return std::exp(v); });
#endif
}
C10_ALWAYS_INLINE Double4 exp_lanes(const Double4& x) {
#if defined(CPU_CAPABILITY_AVX2)
  return Sleef_expd4_u10(x);
#else
  return map_lanes(x, [](double v) { return std::exp(v); });
#endif
}

#if defined(CPU_CAPABILITY_AVX2)
namespace sleef_float {

// A float carried as an unevaluated sum hi + lo, about 48 bits.
struct Pair {
  __m256 hi, lo;
};

// a * b rounded to float on its own, as in Sleef (built with -ffp-contract=off): never fused
// into the add that follows it (without the barrier two lanes of 2^32 came out different).
C10_ALWAYS_INLINE __m256 rounded_mul(__m256 a, __m256 b) {
  return unfused_lanes(_mm256_mul_ps(a, b));
}

// Sums: the low word gathers each add's rounding error (Dekker/Knuth). add_fast assumes
// |a.hi| >= |b.hi|; add_exact does not (its error term is exact for any order).
C10_ALWAYS_INLINE Pair add_exact(__m256 a, __m256 b) {
  const __m256 hi = _mm256_add_ps(a, b);
  const __m256 b_part = _mm256_sub_ps(hi, a);
  return {hi, _mm256_add_ps(_mm256_sub_ps(a, _mm256_sub_ps(hi, b_part)), _mm256_sub_ps(b, b_part))};
}
C10_ALWAYS_INLINE Pair add_exact(const Pair& a, __m256 b) {
  const Pair sum = add_exact(a.hi, b);
  return {sum.hi, _mm256_add_ps(sum.lo, a.lo)};
}
C10_ALWAYS_INLINE Pair add_exact(const Pair& a, const Pair& b) {
  const Pair sum = add_exact(a.hi, b.hi);
  return {sum.hi, _mm256_add_ps(sum.lo, _mm256_add_ps(a.lo, b.lo))};
}
C10_ALWAYS_INLINE Pair add_fast(__m256 a, const Pair& b) {
  const __m256 hi = _mm256_add_ps(a, b.hi);
  return {hi, _mm256_add_ps(_mm256_add_ps(_mm256_sub_ps(a, hi), b.hi), b.lo)};
}
C10_ALWAYS_INLINE Pair add_fast(const Pair& a, const Pair& b) {
  const __m256 hi = _mm256_add_ps(a.hi, b.hi);
  const __m256 err = _mm256_add_ps(_mm256_add_ps(_mm256_sub_ps(a.hi, hi), b.hi), a.lo);
  return {hi, _mm256_add_ps(err, b.lo)};
}

// Products: an FMA gives the exact rounding error of hi = a * b.
C10_ALWAYS_INLINE Pair mul(const Pair& a, __m256 b) {
  const __m256 hi = rounded_mul(a.hi, b);
  return {hi, _mm256_fmadd_ps(a.lo, b, _mm256_fmsub_ps(a.hi, b, hi))};
}
C10_ALWAYS_INLINE Pair mul(const Pair& a, const Pair& b) {
  const __m256 hi = rounded_mul(a.hi, b.hi);
  const __m256 err = _mm256_fmadd_ps(a.lo, b.hi, _mm256_fmsub_ps(a.hi, b.hi, hi));
  return {hi, _mm256_fmadd_ps(a.hi, b.lo, err)};
}
C10_ALWAYS_INLINE Pair square(const Pair& a) {
  const __m256 hi = rounded_mul(a.hi, a.hi);
  return {hi, _mm256_fmadd_ps(_mm256_add_ps(a.hi, a.hi), a.lo, _mm256_fmsub_ps(a.hi, a.hi, hi))};
}

// 1 / a: the float reciprocal, then one Newton step's correction in the low word.
C10_ALWAYS_INLINE Pair reciprocal(const Pair& a) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 hi = _mm256_div_ps(one, a.hi);
  const __m256 residual = _mm256_fnmadd_ps(a.lo, hi, _mm256_fnmadd_ps(a.hi, hi, one));
  return {hi, rounded_mul(hi, residual)};
}
C10_ALWAYS_INLINE Pair divide(const Pair& n, const Pair& d) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 inv = _mm256_div_ps(one, d.hi);
  const __m256 hi = rounded_mul(n.hi, inv);
  const __m256 err = _mm256_fmsub_ps(inv, n.hi, hi);
  const __m256 residual = _mm256_fnmadd_ps(d.lo, inv, _mm256_fnmadd_ps(d.hi, inv, one));
  return {hi, _mm256_fmadd_ps(hi, residual, _mm256_fmadd_ps(n.lo, inv, err))};
}

// e^a for a >= 0 as a pair: 2^q e^s with q = round(a log2 e) and s = a - q ln 2 (ln 2 in two
// parts, s kept as a pair), e^s = 1 + s + s^2 (1/2 + s (1/6 + s p(s))), 2^q applied in two halves.
C10_ALWAYS_INLINE Pair exp_pair(__m256 a) {
  const __m256i q = exp_exponent(a);
  const __m256 q_float = _mm256_cvtepi32_ps(q);
  const __m256 head = rounded_mul(q_float, _mm256_set1_ps(kNegLn2Hi));
  Pair s = add_exact(add_exact(a, head), rounded_mul(q_float, _mm256_set1_ps(kNegLn2Lo)));
  __m256 u = _mm256_fmadd_ps(_mm256_set1_ps(0x1.9f6ffep-13f), s.hi,
                             _mm256_set1_ps(0x1.6d7ef8p-10f));
  u = _mm256_fmadd_ps(u, s.hi, _mm256_set1_ps(0x1.11121ap-7f));
  u = _mm256_fmadd_ps(u, s.hi, _mm256_set1_ps(0x1.5554b8p-5f));
  Pair t = add_exact(mul(s, u), _mm256_set1_ps(0x1.555554p-3f));
  t = add_exact(mul(s, t), _mm256_set1_ps(0.5f));
  t = add_fast(_mm256_set1_ps(1.0f), add_exact(s, mul(square(s), t)));
  const auto [scale_1, scale_2] = power_of_two_halves(q);
  return {rounded_mul(_mm256_mul_ps(t.hi, scale_1), scale_2),
          rounded_mul(_mm256_mul_ps(t.lo, scale_1), scale_2)};
}

}  // namespace sleef_float
#endif

// float tanh, Sleef's tanhf8_u10 (the AVX2 build ATen's Vectorized<float>::tanh calls) operation
// for operation, inline, as exp_lanes: the same bits for every float (all 2^32 patterns compared
// once; tests/cpp/vec_test.cpp compares a sample and the edges). tanh |x| = (e - 1/e) / (e + 1/e)
// with e = e^|x| carried in float pairs; 1 above |x| = 8.664339742 (where it rounds to 1);
// x's sign.
C10_ALWAYS_INLINE Float8 tanh_lanes(const Float8& x) {
#if defined(CPU_CAPABILITY_AVX2)
  using namespace sleef_float;
  const __m256 sign_mask = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
  const __m256 abs_x = _mm256_andnot_ps(sign_mask, x);
  const Pair e = exp_pair(abs_x);
  const Pair inv_e = reciprocal(e);
  const Pair neg_inv_e{_mm256_xor_ps(sign_mask, inv_e.hi), _mm256_xor_ps(sign_mask, inv_e.lo)};
  const Pair q = divide(add_fast(e, neg_inv_e), add_fast(e, inv_e));
  __m256 y = _mm256_add_ps(q.hi, q.lo);
  const __m256 saturated =
      _mm256_or_ps(_mm256_cmp_ps(abs_x, _mm256_set1_ps(0x1.154246p+3f), _CMP_GT_OQ),
                   _mm256_cmp_ps(y, y, _CMP_NEQ_UQ));
  y = _mm256_xor_ps(_mm256_blendv_ps(y, one, saturated), _mm256_and_ps(sign_mask, x));
  return _mm256_or_ps(y, _mm256_cmp_ps(x, x, _CMP_NEQ_UQ));
#else
  return map_lanes(x, [](float v) { return std::tanh(v); });
#endif
}
C10_ALWAYS_INLINE Double4 tanh_lanes(const Double4& x) {
#if defined(CPU_CAPABILITY_AVX2)
  return Sleef_tanhd4_u10(x);
#else
  return map_lanes(x, [](double v) { return std::tanh(v); });
#endif
}

// exp(-x^2) and the x^2 (rounded) it was computed from, as erf_lanes leaves them.
template <typename Reg>
struct Gaussian {
  Reg value;
  Reg x_sq;
};

// erf(x), and into *gaussian (when asked) exp(-x^2) with its x^2, which the erf GELU's
// derivative needs: the float AVX2 erf computes them on the way, so the pair costs one exp.
C10_ALWAYS_INLINE Float8 erf_lanes(const Float8& x, Gaussian<Float8>* gaussian = nullptr) {
#if defined(CPU_CAPABILITY_AVX2)
  // ATen's Vectorized<float>::erf, operation for operation (Abramowitz-Stegun 7.1.26):
  // erf(x) = sign(x) * (1 - t * r(t) * exp(-x^2)), t = 1 / (1 + p |x|).
  const __m256 neg_zero = _mm256_set1_ps(-0.f);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_and_ps(neg_zero, x);
  const __m256 abs_x = _mm256_xor_ps(sign, x);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), abs_x, one));
  __m256 r = _mm256_fmadd_ps(_mm256_set1_ps(1.061405429f), t, _mm256_set1_ps(-1.453152027f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421413741f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284496736f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254829592f));
  const __m256 x_sq = _mm256_mul_ps(x, x);
  const Float8 exp_neg_x_sq = exp_lanes(Float8(_mm256_xor_ps(neg_zero, x_sq)));
  if (gaussian != nullptr) *gaussian = {exp_neg_x_sq, x_sq};
  const __m256 neg_exp = _mm256_xor_ps(neg_zero, exp_neg_x_sq);
  return _mm256_xor_ps(sign, _mm256_fmadd_ps(_mm256_mul_ps(neg_exp, t), r, one));
#else
  if (gaussian != nullptr) *gaussian = {exp_lanes(-(x * x)), x * x};
  return map_lanes(x, [](float v) { return std::erf(v); });
#endif
}
C10_ALWAYS_INLINE Double4 erf_lanes(const Double4& x, Gaussian<Double4>* gaussian = nullptr) {
  if (gaussian != nullptr) *gaussian = {exp_lanes(-(x * x)), x * x};
#if defined(CPU_CAPABILITY_AVX2)
  return Sleef_erfd4_u10(x);
#else
  return map_lanes(x, [](double v) { return std::erf(v); });
#endif
}

// Lane 0 of the reduction of all lanes by op, in ATen's order (vec_reduce_all):
// for AVX2 float, halves then quarters then pairs; otherwise lane by lane.
template <typename A, typename Op>
C10_ALWAYS_INLINE A reduce_lanes(const Lanes<A>& v, const Op& op) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    __m256 r = op(v, Float8(_mm256_permute2f128_ps(v, v, 0x1)));
    r = op(r, Float8(_mm256_shuffle_ps(r, r, 0x4E)));
    r = op(r, Float8(_mm256_shuffle_ps(r, r, 0xB1)));
    return _mm256_cvtss_f32(r);
  }
#endif
  Lanes<A> acc = v;
  for (int j = 1; j < kLanes<A>; ++j) {
    Lanes<A> next{};
    next[0] = v[j];
    acc = op(acc, next);
  }
  return acc[0];
}

// --- bfloat16 / half <-> float ------------------------------------------------------

template <typename T>
C10_ALWAYS_INLINE Float8 widen(const Bits16x8& bits) {
  if constexpr (std::is_same_v<T, BFloat16>) {
#if defined(CPU_CAPABILITY_AVX2)
    // One vpmovzxwd: GCC lowers the generic conversion below as two 128-bit halves.
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(std::bit_cast<__m128i>(bits)), 16));
#else
    return std::bit_cast<Float8>(__builtin_convertvector(bits, Uint32x8) << 16);
#endif
  } else {
#if defined(CPU_CAPABILITY_AVX2)
    return _mm256_cvtph_ps(std::bit_cast<__m128i>(bits));
#else
    Float8 out;
    for (int j = 0; j < 8; ++j) out[j] = static_cast<float>(Half(bits[j], Half::from_bits()));
    return out;
#endif
  }
}

// The bfloat16 nearest v (ties to even) in the low half of each lane, as ATen rounds
// (vec256_16bit_float.h): NaN becomes 0xffff.
C10_ALWAYS_INLINE Uint32x8 bfloat16_bits(const Float8& v) {
  const Uint32x8 bits = std::bit_cast<Uint32x8>(v);
  const Uint32x8 rounded = (bits + ((bits >> 16) & 1) + 0x7fff) >> 16;
  // A NaN lane's all-ones mask, shifted, sets all 16 bits (no blend needed).
  return rounded | (std::bit_cast<Uint32x8>(v != v) >> 16);
}

// The 16 bfloat16 of two registers, lo's first.
C10_ALWAYS_INLINE Bits16x16 narrow_bfloat16(const Float8& lo, const Float8& hi) {
#if defined(CPU_CAPABILITY_AVX2)
  // One saturating pack of both (a plain narrowing: the lanes are at most 0xffff), whose 128-bit
  // lanes interleave the two; the permute puts them in order. GCC lowers each register's
  // __builtin_convertvector as a pack of its own: twice the instructions.
  return std::bit_cast<Bits16x16>(_mm256_permute4x64_epi64(
      _mm256_packus_epi32(std::bit_cast<__m256i>(bfloat16_bits(lo)), std::bit_cast<__m256i>(bfloat16_bits(hi))),
      0xD8));
#else
  const Bits16x8 halves[2] = {__builtin_convertvector(bfloat16_bits(lo), Bits16x8),
                              __builtin_convertvector(bfloat16_bits(hi), Bits16x8)};
  return std::bit_cast<Bits16x16>(halves);
#endif
}

// float -> half, rounding to nearest even.
C10_ALWAYS_INLINE Bits16x8 narrow_half(const Float8& v) {
#if defined(CPU_CAPABILITY_AVX2)
  return std::bit_cast<Bits16x8>(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  Bits16x8 out;
  for (int j = 0; j < 8; ++j) out[j] = Half(v[j]).x;
  return out;
#endif
}

// --- Pack: one step of a row loop ---------------------------------------------------

template <typename T>
struct Pack {
  using Acc = acc_t<T>;
  using Reg = Lanes<Acc>;
  static constexpr int kRegs = static_cast<int>(kStep<T> / kLanes<Acc>);

  Reg reg[kRegs];

  Pack() = default;
  explicit Pack(Acc value) {
    for (Reg& r : reg) r = splat(value);
  }

  template <typename Fn>
  C10_ALWAYS_INLINE Pack map(const Fn& fn) const {
    Pack out;
    for (int k = 0; k < kRegs; ++k) out.reg[k] = fn(reg[k]);
    return out;
  }
  template <typename Fn>
  C10_ALWAYS_INLINE Pack zip(const Pack& other, const Fn& fn) const {
    Pack out;
    for (int k = 0; k < kRegs; ++k) out.reg[k] = fn(reg[k], other.reg[k]);
    return out;
  }

  C10_ALWAYS_INLINE Pack exp() const { return map([](const Reg& x) { return exp_lanes(x); }); }
  C10_ALWAYS_INLINE Pack erf() const { return map([](const Reg& x) { return erf_lanes(x); }); }
  // erf, with exp(-x^2) and its rounded x^2 (erf_lanes).
  C10_ALWAYS_INLINE Pack erf(Pack& gaussian, Pack& x_sq) const {
    Pack out;
    for (int k = 0; k < kRegs; ++k) {
      Gaussian<Reg> g;
      out.reg[k] = erf_lanes(reg[k], &g);
      gaussian.reg[k] = g.value;
      x_sq.reg[k] = g.x_sq;
    }
    return out;
  }
  C10_ALWAYS_INLINE Pack tanh() const { return map([](const Reg& x) { return tanh_lanes(x); }); }
  C10_ALWAYS_INLINE Pack neg() const { return map([](const Reg& x) { return -x; }); }
  C10_ALWAYS_INLINE Pack abs() const {
    // Clears the sign bit (NaNs included), as ATen's abs.
    using Mask = LaneMask<Acc>;
    return map([](const Reg& x) {
      return std::bit_cast<Reg>(std::bit_cast<Mask>(x) & ~std::bit_cast<Mask>(splat(Acc(-0.0))));
    });
  }
  // Comparisons as lane masks (all bits set where true), for blendv.
  C10_ALWAYS_INLINE Pack operator<=(const Pack& other) const {
    return zip(other, [](const Reg& a, const Reg& b) { return std::bit_cast<Reg>(a <= b); });
  }
  // Comparisons as 1 (true) or 0 (false), for counting.
  C10_ALWAYS_INLINE Pack lt(const Pack& other) const {
    return zip(other, [](const Reg& a, const Reg& b) { return a < b ? splat(Acc(1)) : Reg{}; });
  }
  C10_ALWAYS_INLINE Pack gt(const Pack& other) const {
    return zip(other, [](const Reg& a, const Reg& b) { return a > b ? splat(Acc(1)) : Reg{}; });
  }
  // b where mask (a comparison's) is set, else a.
  C10_ALWAYS_INLINE static Pack blendv(const Pack& a, const Pack& b, const Pack& mask) {
    Pack out;
    for (int k = 0; k < kRegs; ++k) {
      out.reg[k] = std::bit_cast<LaneMask<Acc>>(mask.reg[k]) < 0 ? b.reg[k] : a.reg[k];
    }
    return out;
  }
};

template <typename T>
C10_ALWAYS_INLINE Pack<T> operator+(const Pack<T>& a, const Pack<T>& b) {
  return a.zip(b, [](const auto& x, const auto& y) { return x + y; });
}
template <typename T>
C10_ALWAYS_INLINE Pack<T> operator-(const Pack<T>& a, const Pack<T>& b) {
  return a.zip(b, [](const auto& x, const auto& y) { return x - y; });
}
template <typename T>
C10_ALWAYS_INLINE Pack<T> operator*(const Pack<T>& a, const Pack<T>& b) {
  return a.zip(b, [](const auto& x, const auto& y) { return x * y; });
}
template <typename T>
C10_ALWAYS_INLINE Pack<T> operator/(const Pack<T>& a, const Pack<T>& b) {
  return a.zip(b, [](const auto& x, const auto& y) { return x / y; });
}
template <typename T>
C10_ALWAYS_INLINE Pack<T> maximum(const Pack<T>& a, const Pack<T>& b) {
  return a.zip(b, [](const auto& x, const auto& y) { return maximum_lanes(x, y); });
}
// a * b + c, one rounding (FMA) where the hardware has it.
template <typename T>
C10_ALWAYS_INLINE Pack<T> fmadd(const Pack<T>& a, const Pack<T>& b, const Pack<T>& c) {
  Pack<T> out;
  for (int k = 0; k < Pack<T>::kRegs; ++k) out.reg[k] = fmadd_lanes(a.reg[k], b.reg[k], c.reg[k]);
  return out;
}

// Loads `count` (<= kStep<T>) values of U, where U is T or T's accumulation type
// (float32 parameters next to half inputs). Lanes at and past `count` are zero.
template <typename T, typename U>
C10_ALWAYS_INLINE Pack<T> load(const U* p, int64_t count = kStep<T>) {
  constexpr int kRegs = Pack<T>::kRegs;
  Pack<T> out;
  if constexpr (std::is_same_v<U, acc_t<T>>) {
    for (int k = 0; k < kRegs; ++k) {
      const U* pk = p + k * kLanes<U>;
      if (count == kStep<T>) {
        std::memcpy(&out.reg[k], pk, sizeof(out.reg[k]));
      } else {
        out.reg[k] = load_lanes(pk, count - k * kLanes<U>);
      }
    }
  } else {
    static_assert(std::is_same_v<U, T> && kRegs == 2, "U must be T or T's accumulation type");
    Bits16x8 bits[kRegs] = {};
    std::memcpy(bits, p, std::min(count, kStep<T>) * sizeof(T));
    for (int k = 0; k < kRegs; ++k) out.reg[k] = widen<T>(bits[k]);
  }
  return out;
}

// Stores the first `count` (<= kStep<T>) lanes into U, where U is T (half types
// round to nearest even) or T's accumulation type (float32 partial sums).
template <typename T, typename U>
C10_ALWAYS_INLINE void store(U* p, const Pack<T>& v, int64_t count = kStep<T>) {
  constexpr int kRegs = Pack<T>::kRegs;
  if constexpr (std::is_same_v<U, acc_t<T>>) {
    for (int k = 0; k < kRegs; ++k) {
      U* pk = p + k * kLanes<U>;
      if (count == kStep<T>) {
        std::memcpy(pk, &v.reg[k], sizeof(v.reg[k]));
      } else {
        store_lanes(pk, v.reg[k], count - k * kLanes<U>);
      }
    }
  } else {
    static_assert(std::is_same_v<U, T> && kRegs == 2, "U must be T or T's accumulation type");
    const int64_t bytes = std::clamp<int64_t>(count, 0, kStep<T>) * sizeof(T);
    if constexpr (std::is_same_v<T, BFloat16>) {
      const Bits16x16 bits = narrow_bfloat16(v.reg[0], v.reg[1]);
      std::memcpy(p, &bits, bytes);
    } else {
      const Bits16x8 bits[kRegs] = {narrow_half(v.reg[0]), narrow_half(v.reg[1])};
      std::memcpy(p, bits, bytes);
    }
  }
}

// What storing as T and loading back gives: the value a later pass will read.
template <typename T>
C10_ALWAYS_INLINE Pack<T> round_to(const Pack<T>& v) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return v;
  } else if constexpr (std::is_same_v<T, BFloat16>) {
    return v.map([](const Float8& x) { return std::bit_cast<Float8>(bfloat16_bits(x) << 16); });
  } else {
    return v.map([](const Float8& x) { return widen<T>(narrow_half(x)); });
  }
}

// unfused_lanes for each register: a quantity computed in two passes then rounds the same way
// in both, and exact cancellations between them stay exact.
template <typename T>
C10_ALWAYS_INLINE Pack<T> unfused(Pack<T> v) {
  return v.map([](const typename Pack<T>::Reg& r) { return unfused_lanes(r); });
}

template <typename T>
C10_ALWAYS_INLINE acc_t<T> sum_lanes(const Pack<T>& v) {
  auto sum = v.reg[0];
  for (int k = 1; k < Pack<T>::kRegs; ++k) sum = sum + v.reg[k];
  return reduce_lanes<acc_t<T>>(sum, [](const auto& a, const auto& b) { return a + b; });
}

// The largest lane, NaN if any lane is NaN.
template <typename T>
C10_ALWAYS_INLINE acc_t<T> max_lanes(const Pack<T>& v) {
  auto max = v.reg[0];
  for (int k = 1; k < Pack<T>::kRegs; ++k) max = maximum_lanes(max, v.reg[k]);
  return reduce_lanes<acc_t<T>>(max, [](const auto& a, const auto& b) { return maximum_lanes(a, b); });
}

// Calls body(offset, count) for each step of a row of n elements; the last
// step may be partial (count < kStep<T>).
template <typename T, typename Body>
C10_ALWAYS_INLINE void for_each_step(int64_t n, const Body& body) {
  int64_t i = 0;
  for (; i + kStep<T> <= n; i += kStep<T>) {
    body(i, kStep<T>);
  }
  if (i < n) {
    body(i, n - i);
  }
}

// Elements per block of sum_row (a multiple of 2 * kStep<T> for every T).
inline constexpr int64_t kSumBlock = 512;

// Sums over a row, two accumulators per sum for instruction-level parallelism.
// The accumulators restart every kSumBlock elements and the block sums are added
// separately: rounding error grows with the length of each running sum, and one
// running sum over a whole row made float32 LayerNorm/RMSNorm outputs up to 3x
// less accurate than F.layer_norm's (cascade sum) at d = 16K..64K.
//
// sum_row: one sum of term(i, count) -> Pack.
template <typename T, typename Term>
C10_ALWAYS_INLINE acc_t<T> sum_row(int64_t n, const Term& term) {
  Pack<T> total(0);
  for (int64_t block = 0; block < n; block += kSumBlock) {
    const int64_t end = std::min(n, block + kSumBlock);
    Pack<T> acc0(0), acc1(0);
    int64_t i = block;
    for (; i + 2 * kStep<T> <= end; i += 2 * kStep<T>) {
      acc0 = acc0 + term(i, kStep<T>);
      acc1 = acc1 + term(i + kStep<T>, kStep<T>);
    }
    for (; i < end; i += kStep<T>) {
      acc0 = acc0 + term(i, std::min(kStep<T>, end - i));
    }
    total = total + (acc0 + acc1);
  }
  return sum_lanes<T>(total);
}

// sum_row_pair: two sums at once; step(i, count, acc_a, acc_b) adds its terms
// into the accumulators it is given. Accumulating in place rather than returning
// a pair of Packs keeps the half types' two-register Packs in registers.
template <typename T, typename Step>
C10_ALWAYS_INLINE std::pair<acc_t<T>, acc_t<T>> sum_row_pair(int64_t n, const Step& step) {
  Pack<T> total_a(0), total_b(0);
  for (int64_t block = 0; block < n; block += kSumBlock) {
    const int64_t end = std::min(n, block + kSumBlock);
    Pack<T> a0(0), b0(0), a1(0), b1(0);
    int64_t i = block;
    for (; i + 2 * kStep<T> <= end; i += 2 * kStep<T>) {
      step(i, kStep<T>, a0, b0);
      step(i + kStep<T>, kStep<T>, a1, b1);
    }
    for (; i < end; i += kStep<T>) {
      step(i, std::min(kStep<T>, end - i), a0, b0);
    }
    total_a = total_a + (a0 + a1);
    total_b = total_b + (b0 + b1);
  }
  return {sum_lanes<T>(total_a), sum_lanes<T>(total_b)};
}

// Zeroes the lanes past `count` (loads already do; derived values like x - mean need it).
template <typename T>
C10_ALWAYS_INLINE Pack<T> valid_lanes(const Pack<T>& v, int64_t count) {
  if (count == kStep<T>) return v;
  using Acc = acc_t<T>;
  Pack<T> out;
  for (int k = 0; k < Pack<T>::kRegs; ++k) {
    const auto index = lane_index<Acc>() + static_cast<LaneInt<Acc>>(k * kLanes<Acc>);
    out.reg[k] = index < static_cast<LaneInt<Acc>>(count) ? v.reg[k] : typename Pack<T>::Reg{};
  }
  return out;
}

}  // namespace ffn::cpu
