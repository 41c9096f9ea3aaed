// 128-bit vectorized loads and stores for the CUDA kernels, with tails and
// dtype conversion, written once for every dtype.
//
// A kernel steps over a row kVecWidth<T> elements (one 128-bit word of T) at a
// time. `vectorized` is decided once per launch on the host (every base pointer
// 16-byte aligned and the row length a multiple of the word): then a full word
// is one 128-bit access; otherwise, and for a partial word at the end of a row,
// elements are accessed one by one. Elements at and past `count` read as zero
// and are not written.
#pragma once

#include "runtime.cuh"
#include "tensor.h"

#include <cstdint>
#include <initializer_list>

namespace ffn::cuda {

// Accumulation type: float for half types and float, double for double.
template <typename T>
using acc_t = acc_type<T>;

// Elements of T in one 128-bit word.
template <typename T>
inline constexpr int kVecWidth = 16 / static_cast<int>(sizeof(T));

// One 128-bit word of T, as raw values (kept unconverted in registers: a row
// of a 16-bit type then takes half the registers of its float32 values).
template <typename T>
struct alignas(16) Vec {
  T val[kVecWidth<T>];
};

// Whether 128-bit accesses are possible through every given pointer (null ones
// are unused).
inline bool all_aligned16(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
__device__ __forceinline__ Vec<T> zero_word() {
  Vec<T> v;
#pragma unroll
  for (int k = 0; k < kVecWidth<T>; ++k) v.val[k] = T(0);
  return v;
}

// The word of T at p, unconverted.
template <typename T>
__device__ __forceinline__ Vec<T> load_word(const T* p, int64_t count, bool vectorized) {
  if (vectorized && count >= kVecWidth<T>) return *reinterpret_cast<const Vec<T>*>(p);
  Vec<T> v;
#pragma unroll
  for (int k = 0; k < kVecWidth<T>; ++k) v.val[k] = k < count ? p[k] : T(0);
  return v;
}

// Stores the first `count` elements of the word v at p.
template <typename T>
__device__ __forceinline__ void store_word(T* p, int64_t count, bool vectorized, const Vec<T>& v) {
  if (vectorized && count >= kVecWidth<T>) {
    *reinterpret_cast<Vec<T>*>(p) = v;
    return;
  }
#pragma unroll
  for (int k = 0; k < kVecWidth<T>; ++k) {
    if (k < count) p[k] = v.val[k];
  }
}

// N consecutive elements of U at p, converted to A. N is a multiple of U's word
// (a float32 weight next to bfloat16 x: 8 floats, two words).
template <int N, typename A, typename U>
__device__ __forceinline__ void load(const U* p, int64_t count, bool vectorized, A (&out)[N]) {
  constexpr int kWord = kVecWidth<U>;
  static_assert(N % kWord == 0, "load: N must be a whole number of 128-bit words of U");
  if (vectorized && count >= N) {
#pragma unroll
    for (int w = 0; w < N / kWord; ++w) {
      const Vec<U> word = reinterpret_cast<const Vec<U>*>(p)[w];
#pragma unroll
      for (int k = 0; k < kWord; ++k) out[w * kWord + k] = static_cast<A>(word.val[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = k < count ? static_cast<A>(p[k]) : A(0);
  }
}

// Stores the first min(count, N) values of `in` at p as U (round to nearest even).
template <int N, typename U, typename A>
__device__ __forceinline__ void store(U* p, int64_t count, bool vectorized, const A (&in)[N]) {
  constexpr int kWord = kVecWidth<U>;
  static_assert(N % kWord == 0, "store: N must be a whole number of 128-bit words of U");
  if (vectorized && count >= N) {
#pragma unroll
    for (int w = 0; w < N / kWord; ++w) {
      Vec<U> word;
#pragma unroll
      for (int k = 0; k < kWord; ++k) word.val[k] = static_cast<U>(in[w * kWord + k]);
      reinterpret_cast<Vec<U>*>(p)[w] = word;
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (k < count) p[k] = static_cast<U>(in[k]);
    }
  }
}

}  // namespace ffn::cuda
