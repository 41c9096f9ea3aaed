// Activation formulas of the CPU kernels, on vector packs (vec.h): the
// FFN ops' fused elementwise passes (ffn.cpp) and the telemetry (telemetry.cpp)
// share them, so the statistics describe exactly the
// activations the forward computes.
//
// The formulas follow ATen's vectorized CPU kernels (Activation.cpp) term for
// term, so float32 values match them bit for bit, tails included, and so do the
// gradients but for the erf GELU's: its derivative takes exp(-x^2/2) from the exp
// the erf computes anyway (one exp per element, not two). Its last bits differ from
// ATen's for some inputs, at the same accuracy against float64 (tests/test_ffn.py
// measures both). (F.gelu with approximate="none" on a contiguous float32 tensor
// runs oneDNN's GELU instead, and ATen's scalar remainder loop uses std::erf and
// std::exp: both differ from ATen's vectorized loop in the last bit too.)
#pragma once

#include "activation_table.h"

#include <torch/headeronly/macros/Macros.h>

#include <cmath>
#include <utility>

namespace ffn::cpu {

// Each activation, with the same members as the CUDA ones (cuda/activation.cuh):
// value(x) = act(x), and value_and_grad(x, dy) = {act(x), dy * act'(x)}.
template <Activation kAct>
struct Act;

template <>
struct Act<Activation::kGelu> {
  template <typename V>
  C10_ALWAYS_INLINE static V value(const V& x) {
    return x * V(0.5) * (V(1) + (x * V(M_SQRT1_2)).erf());
  }
  template <typename V>
  C10_ALWAYS_INLINE static std::pair<V, V> value_and_grad(const V& x, const V& dy) {
    // One exp, not two: exp(-x^2 / 2) comes out of erf(v), v = x / sqrt 2, as exp(-v^2). That
    // exp's argument is off from ATen's (x * x * -0.5) by d = v^2 - x^2 / 2 (both rounded; their
    // difference is exact), a few ulps of it: exp(a + d) = exp(a) * (1 + d) to float precision.
    V gaussian, v_sq;
    const V cdf = V(0.5) * (V(1) + (x * V(M_SQRT1_2)).erf(gaussian, v_sq));
    const V d = v_sq - x * x * V(0.5);
    const V pdf = V(M_2_SQRTPI * M_SQRT1_2 * 0.5) * (gaussian + gaussian * d);
    return {x * cdf, dy * (cdf + x * pdf)};
  }
};

template <>
struct Act<Activation::kGeluTanh> {
  static constexpr double kBeta = M_SQRT2 * M_2_SQRTPI * 0.5;
  static constexpr double kKappa = 0.044715;
  template <typename V>
  C10_ALWAYS_INLINE static V value(const V& x) {
    const V inner = V(kBeta) * (x + V(kKappa) * (x * x * x));
    return V(0.5) * x * (V(1) + inner.tanh());
  }
  template <typename V>
  C10_ALWAYS_INLINE static std::pair<V, V> value_and_grad(const V& x, const V& dy) {
    const V x_sq = x * x;
    const V tanh_inner = (V(kBeta) * (x + V(kKappa) * (x_sq * x))).tanh();
    const V left = V(0.5) * x;
    const V right = V(1) + tanh_inner;
    const V right_grad = (V(1) - tanh_inner * tanh_inner) * (V(kBeta) * (V(1) + V(3 * kKappa) * x_sq));
    return {left * right, dy * (V(0.5) * right + left * right_grad)};
  }
};

template <>
struct Act<Activation::kSilu> {
  template <typename V>
  C10_ALWAYS_INLINE static V value(const V& x) {
    return x / (V(1) + x.neg().exp());
  }
  template <typename V>
  C10_ALWAYS_INLINE static std::pair<V, V> value_and_grad(const V& x, const V& dy) {
    const V one_plus_exp = V(1) + x.neg().exp();
    const V sigmoid = V(1) / one_plus_exp;
    // The value as value() computes it (not x * sigmoid): the hidden activation
    // backward recomputes for w_down's gradient is then the forward's, bit for bit.
    return {x / one_plus_exp, dy * (sigmoid * (V(1) + x * (V(1) - sigmoid)))};
  }
};

template <>
struct Act<Activation::kRelu> {
  template <typename V>
  C10_ALWAYS_INLINE static V value(const V& x) {
    return maximum(x, V(0));  // propagates NaN like torch.relu
  }
  template <typename V>
  C10_ALWAYS_INLINE static std::pair<V, V> value_and_grad(const V& x, const V& dy) {
    // ATen's threshold_backward: derivative 0 where x <= 0 (x == 0 included), else 1,
    // so a NaN input passes its gradient through, as on CUDA.
    return {maximum(x, V(0)), dy * V::blendv(V(1), V(0), x <= V(0))};
  }
};

}  // namespace ffn::cpu
