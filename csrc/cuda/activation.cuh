// Activation formulas of the CUDA kernels, shared by the FFN elementwise
// kernels (ffn.cu) and the telemetry (telemetry.cu), so the statistics
// describe exactly the activations the forward computes.
//
// The formulas are ATen's CUDA ones term for term (ActivationGeluKernel.cu,
// ActivationSiluKernel.cu, relu as clamp_min / threshold_backward), so results
// match F.gelu / F.silu / F.relu. Math in float32 (float64 for float64).
#pragma once

#include "activation_table.h"
#include "runtime.cuh"

#include <cmath>
#include <utility>

namespace ffn::cuda {

__device__ __forceinline__ float erf_acc(float v) { return erff(v); }
__device__ __forceinline__ double erf_acc(double v) { return erf(v); }
__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }
__device__ __forceinline__ float tanh_acc(float v) { return tanhf(v); }
__device__ __forceinline__ double tanh_acc(double v) { return tanh(v); }

// Each activation, with the same members as the CPU ones (cpu/activation.h):
// value(x) = act(x), and value_and_grad(x, dy) = {act(x), dy * act'(x)}.
template <Activation kAct>
struct Act;

template <>
struct Act<Activation::kGelu> {
  template <typename A>
  __device__ static A value(A x) {
    constexpr A kAlpha = M_SQRT1_2;
    return x * A(0.5) * (A(1) + erf_acc(x * kAlpha));
  }
  template <typename A>
  __device__ static std::pair<A, A> value_and_grad(A x, A dy) {
    constexpr A kBeta = M_2_SQRTPI * M_SQRT1_2 * A(0.5);
    constexpr A kAlpha = M_SQRT1_2;
    const A cdf = A(0.5) * (A(1) + erf_acc(x * kAlpha));
    const A pdf = exp_acc(A(-0.5) * x * x) * kBeta;
    return {value(x), dy * (cdf + x * pdf)};
  }
};

template <>
struct Act<Activation::kGeluTanh> {
  template <typename A>
  __device__ static A value(A x) {
    constexpr A kBeta = M_SQRT2 * M_2_SQRTPI * A(0.5);
    constexpr A kKappa = 0.044715;
    const A x_cube = x * x * x;
    const A inner = kBeta * (x + kKappa * x_cube);
    return A(0.5) * x * (A(1) + tanh_acc(inner));
  }
  template <typename A>
  __device__ static std::pair<A, A> value_and_grad(A x, A dy) {
    constexpr A kBeta = M_SQRT2 * M_2_SQRTPI * A(0.5);
    constexpr A kKappa = 0.044715;
    const A x_sq = x * x;
    const A x_cube = x_sq * x;
    const A inner = kBeta * (x + kKappa * x_cube);
    const A tanh_inner = tanh_acc(inner);
    const A left = A(0.5) * x;
    const A right = A(1) + tanh_inner;
    const A left_derivative = A(0.5) * right;
    const A tanh_derivative = A(1) - tanh_inner * tanh_inner;
    const A inner_derivative = kBeta * (A(1) + A(3) * kKappa * x_sq);
    const A right_derivative = left * tanh_derivative * inner_derivative;
    return {value(x), dy * (left_derivative + right_derivative)};
  }
};

template <>
struct Act<Activation::kSilu> {
  template <typename A>
  __device__ static A value(A x) {
    return x / (A(1) + exp_acc(-x));
  }
  template <typename A>
  __device__ static std::pair<A, A> value_and_grad(A x, A dy) {
    const A sigmoid = A(1) / (A(1) + exp_acc(-x));
    return {value(x), dy * sigmoid * (A(1) + x * (A(1) - sigmoid))};
  }
};

template <>
struct Act<Activation::kRelu> {
  template <typename A>
  __device__ static A value(A x) {
    return x <= A(0) ? A(0) : x;  // NaN propagates, as clamp_min
  }
  template <typename A>
  __device__ static std::pair<A, A> value_and_grad(A x, A dy) {
    return {value(x), x <= A(0) ? A(0) : dy};  // threshold_backward: zero gradient at 0
  }
};

}  // namespace ffn::cuda
