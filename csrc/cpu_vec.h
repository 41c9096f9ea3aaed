// Vectorized load/store for the CPU kernels, written once for every dtype.
//
// A row loop steps over Vectorized<T>::size() elements of T at a time and does
// its math in T's accumulation type (float for half types, else T): the step is
// held as a Pack = VectorizedN<acc_t, kN> (two float vectors per bfloat16/half
// vector, one otherwise), so half types are converted once on load and once on
// store and never round in between.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/vec_n.h>

#include <algorithm>
#include <type_traits>

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
inline Pack<T> load(const U* p, int64_t count = kStep<T>) {
  using Traits = VecTraits<T>;
  using AccVec = typename Traits::AccVec;
  Pack<T> out;
  if constexpr (std::is_same_v<U, acc_t<T>>) {
    for (int k = 0; k < Traits::kN; ++k) {
      const int64_t n = std::clamp<int64_t>(count - k * AccVec::size(), 0, AccVec::size());
      out[k] = n == AccVec::size() ? AccVec::loadu(p + k * AccVec::size())
                                   : AccVec::set(AccVec(0), AccVec::loadu(p + k * AccVec::size(), n), n);
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

// Stores the first `count` (<= kStep<T>) lanes as T (round to nearest even).
template <typename T>
inline void store(T* p, const Pack<T>& v, int64_t count = kStep<T>) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    if (count == kStep<T>) {
      v.store(p);
    } else {
      v.store(p, static_cast<int>(count));
    }
  } else {
    const auto out = at::vec::convert_from_float<T>(v[0], v[1]);
    if (count == kStep<T>) {
      out.store(p);
    } else {
      out.store(p, static_cast<int>(count));
    }
  }
}

// What storing as T and loading back gives: the value a later pass will read.
template <typename T>
inline Pack<T> round_to(const Pack<T>& v) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return v;
  } else {
    auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v[0], v[1]));
    return Pack<T>(lo, hi);
  }
}

template <typename T>
inline acc_t<T> sum_lanes(const Pack<T>& v) {
  return at::vec::vec_reduce_all<acc_t<T>>(
      [](const auto& a, const auto& b) { return a + b; }, v);
}

// Calls body(offset, count) for each step of a row of n elements; the last
// step may be partial (count < kStep<T>).
template <typename T, typename Body>
inline void for_each_step(int64_t n, const Body& body) {
  int64_t i = 0;
  for (; i + kStep<T> <= n; i += kStep<T>) {
    body(i, kStep<T>);
  }
  if (i < n) {
    body(i, n - i);
  }
}

// Sum over a row of term(i, count) -> Pack, two accumulators for instruction-level parallelism.
template <typename T, typename Term>
inline acc_t<T> sum_row(int64_t n, const Term& term) {
  Pack<T> acc0(0), acc1(0);
  int64_t i = 0;
  for (; i + 2 * kStep<T> <= n; i += 2 * kStep<T>) {
    acc0 = acc0 + term(i, kStep<T>);
    acc1 = acc1 + term(i + kStep<T>, kStep<T>);
  }
  for (; i < n; i += kStep<T>) {
    acc0 = acc0 + term(i, std::min(kStep<T>, n - i));
  }
  return sum_lanes<T>(acc0 + acc1);
}

// Zeroes the lanes past `count` (loads already do; derived values like x - mean need it).
template <typename T>
inline Pack<T> valid_lanes(const Pack<T>& v, int64_t count) {
  return count == kStep<T> ? v : Pack<T>::set(Pack<T>(0), v, count);
}

}  // namespace ffn::cpu
