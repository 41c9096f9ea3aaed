// Vectorized load/store for the CPU kernels, written once for every dtype.
//
// A row loop steps over Vectorized<T>::size() elements of T at a time and does
// its math in T's accumulation type (float for half types, else T): the step is
// held as a Pack = VectorizedN<acc_t, kN> (two float vectors per bfloat16/half
// vector, one otherwise), so half types are converted once on load and once on
// store and never round in between.
//
// The helpers are forced inline (and so are the kernels' per-step lambdas, with
// C10_ALWAYS_INLINE_ATTRIBUTE): they run once per vector step of every row loop,
// and GCC otherwise stops inlining them once a kernel grows, which costs an
// out-of-line call per step and sends every vector through memory.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/vec_n.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <type_traits>
#include <utility>

namespace ffn::cpu {

template <typename T>
struct VecTraits {
  using acc_t = at::opmath_type<T>;
  using AccVec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t kStep = at::vec::Vectorized<T>::size();
  static constexpr int kN = static_cast<int>(kStep / AccVec::size());
  using Pack = at::vec::VectorizedN<acc_t, kN>;
};

template <typename T>
using acc_t = typename VecTraits<T>::acc_t;
template <typename T>
using Pack = typename VecTraits<T>::Pack;
template <typename T>
inline constexpr int64_t kStep = VecTraits<T>::kStep;

// Loads `count` (<= kStep<T>) values of U, where U is T or T's accumulation type
// (float32 parameters next to half inputs). Lanes at and past `count` are zero.
template <typename T, typename U>
C10_ALWAYS_INLINE Pack<T> load(const U* p, int64_t count = kStep<T>) {
  using Traits = VecTraits<T>;
  using AccVec = typename Traits::AccVec;
  Pack<T> out;
  if constexpr (std::is_same_v<U, acc_t<T>>) {
    for (int k = 0; k < Traits::kN; ++k) {
      const U* pk = p + k * AccVec::size();
      if (count == Traits::kStep) {
        out[k] = AccVec::loadu(pk);
      } else {
        const int64_t n = std::clamp<int64_t>(count - k * AccVec::size(), 0, AccVec::size());
        out[k] = AccVec::set(AccVec(0), AccVec::loadu(pk, n), n);
      }
    }
  } else {
    static_assert(std::is_same_v<U, T> && Traits::kN == 2, "U must be T or T's accumulation type");
    using Vec = at::vec::Vectorized<T>;
    const Vec v = count == Traits::kStep ? Vec::loadu(p) : Vec::loadu(p, count);
    auto [lo, hi] = at::vec::convert_to_float<T>(v);
    out = Pack<T>(lo, hi);
    if (count < Traits::kStep) {
      out = Pack<T>::set(Pack<T>(0), out, count);
    }
  }
  return out;
}

// Stores the first `count` (<= kStep<T>) lanes into U, where U is T (half types
// round to nearest even) or T's accumulation type (float32 partial sums).
template <typename T, typename U>
C10_ALWAYS_INLINE void store(U* p, const Pack<T>& v, int64_t count = kStep<T>) {
  using Traits = VecTraits<T>;
  using AccVec = typename Traits::AccVec;
  if constexpr (std::is_same_v<U, acc_t<T>>) {
    for (int k = 0; k < Traits::kN; ++k) {
      U* pk = p + k * AccVec::size();
      if (count == Traits::kStep) {
        v[k].store(pk);
      } else {
        const int64_t n = std::clamp<int64_t>(count - k * AccVec::size(), 0, AccVec::size());
        if (n > 0) v[k].store(pk, static_cast<int>(n));
      }
    }
  } else {
    static_assert(std::is_same_v<U, T> && Traits::kN == 2, "U must be T or T's accumulation type");
    const auto out = at::vec::convert_from_float<T>(v[0], v[1]);
    if (count == Traits::kStep) {
      out.store(p);
    } else {
      out.store(p, static_cast<int>(count));
    }
  }
}

// What storing as T and loading back gives: the value a later pass will read.
template <typename T>
C10_ALWAYS_INLINE Pack<T> round_to(const Pack<T>& v) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return v;
  } else {
    auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v[0], v[1]));
    return Pack<T>(lo, hi);
  }
}

// v exactly as computed, opaque to the optimizer: the multiply that produced v is
// not fused into a later add or subtract (FMA contraction, which GCC does with
// -mfma). A quantity computed in two passes then rounds the same way in both, and
// exact cancellations between them stay exact. (Without FMA there is no contraction.)
template <typename T>
C10_ALWAYS_INLINE Pack<T> unfused(Pack<T> v) {
#if defined(CPU_CAPABILITY_AVX2) && defined(__GNUC__)
  for (int k = 0; k < VecTraits<T>::kN; ++k) {
    if constexpr (std::is_same_v<acc_t<T>, double>) {
      __m256d raw = v[k];
      asm("" : "+x"(raw));
      v[k] = raw;
    } else {
      __m256 raw = v[k];
      asm("" : "+x"(raw));
      v[k] = raw;
    }
  }
#endif
  return v;
}

template <typename T>
C10_ALWAYS_INLINE acc_t<T> sum_lanes(const Pack<T>& v) {
  auto sum = v[0];
  for (int k = 1; k < VecTraits<T>::kN; ++k) sum = sum + v[k];
  return at::vec::vec_reduce_all<acc_t<T>>([](const auto& a, const auto& b) { return a + b; }, sum);
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
// a pair of Packs keeps the half types' two-vector Packs in registers.
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
  return count == kStep<T> ? v : Pack<T>::set(Pack<T>(0), v, count);
}

}  // namespace ffn::cpu
