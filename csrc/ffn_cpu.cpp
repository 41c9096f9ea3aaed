// CPU kernels of the FFN ops' fused elementwise passes: bias + activation
// (+ gate * up) forward, the activation's derivative backward. Registers every
// CPU kernel of the library (norm kernels: norm_cpu.cpp).
//
// Activation formulas follow ATen's CPU kernels (Activation.cpp) term for term,
// so float32 results match F.gelu / F.silu / F.relu bit for bit.
#include "cpu_vec.h"
#include "ffn.h"
#include "registration.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace ffn {
namespace cpu {
namespace {

constexpr int64_t kGrainElements = 32768;

// Each activation: value(x), and value_and_grad(x) -> {act(x), act'(x)}.
template <Activation kAct>
struct Act;

template <>
struct Act<Activation::kGelu> {
  template <typename V>
  C10_ALWAYS_INLINE static V value(const V& x) {
    return x * V(0.5) * (V(1) + (x * V(M_SQRT1_2)).erf());
  }
  template <typename V>
  C10_ALWAYS_INLINE static std::pair<V, V> value_and_grad(const V& x) {
    const V cdf = V(0.5) * (V(1) + (x * V(M_SQRT1_2)).erf());
    const V pdf = V(M_2_SQRTPI * M_SQRT1_2 * 0.5) * (x * x * V(-0.5)).exp();
    return {x * cdf, cdf + x * pdf};
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
  C10_ALWAYS_INLINE static std::pair<V, V> value_and_grad(const V& x) {
    const V x_sq = x * x;
    const V tanh_inner = (V(kBeta) * (x + V(kKappa) * (x_sq * x))).tanh();
    const V left = V(0.5) * x;
    const V right = V(1) + tanh_inner;
    const V right_grad = (V(1) - tanh_inner * tanh_inner) * (V(kBeta) * (V(1) + V(3 * kKappa) * x_sq));
    return {left * right, V(0.5) * right + left * right_grad};
  }
};

template <>
struct Act<Activation::kSilu> {
  template <typename V>
  C10_ALWAYS_INLINE static V value(const V& x) {
    return x / (V(1) + x.neg().exp());
  }
  template <typename V>
  C10_ALWAYS_INLINE static std::pair<V, V> value_and_grad(const V& x) {
    const V sigmoid = V(1) / (V(1) + x.neg().exp());
    return {x * sigmoid, sigmoid * (V(1) + x * (V(1) - sigmoid))};
  }
};

template <>
struct Act<Activation::kRelu> {
  template <typename V>
  C10_ALWAYS_INLINE static V value(const V& x) {
    return maximum(x, V(0));  // propagates NaN like torch.relu
  }
  template <typename V>
  C10_ALWAYS_INLINE static std::pair<V, V> value_and_grad(const V& x) {
    // Derivative 1 where x > 0, else 0 (ATen's threshold_backward: 0 at x == 0).
    return {maximum(x, V(0)), V::blendv(V(0), V(1), x > V(0))};
  }
};

template <typename Fn>
void dispatch_activation(Activation act, const Fn& fn) {
  switch (act) {
    case Activation::kGelu: return fn(Act<Activation::kGelu>{});
    case Activation::kGeluTanh: return fn(Act<Activation::kGeluTanh>{});
    case Activation::kSilu: return fn(Act<Activation::kSilu>{});
    case Activation::kRelu: return fn(Act<Activation::kRelu>{});
  }
}

// z + bias as the pre-activation the forward stored (rounded to T).
template <typename T>
C10_ALWAYS_INLINE Pack<T> preact_at(const T* z, const T* bias, int64_t i, int64_t n) {
  const auto v = load<T>(z + i, n);
  return bias == nullptr ? v : round_to<T>(v + load<T>(bias + i, n));
}

template <typename T, typename A>
void forward_kernel(const Tensor& z, const Tensor& bias, bool gated, bool write_preact,
                    const Tensor& h) {
  const int64_t rows = h.size(0), F = h.size(1), z_cols = z.size(1);
  T* Z = z.data_ptr<T>();
  const T* B = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  T* H = h.mutable_data_ptr<T>();
  const bool store_preact = write_preact && B != nullptr;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(z_cols, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* zr = Z + r * z_cols;
      T* hr = H + r * F;
      for_each_step<T>(F, [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
        const auto g = preact_at<T>(zr, B, i, n);
        auto out = A::value(g);
        if (store_preact) store<T>(zr + i, g, n);
        if (gated) {
          const auto u = preact_at<T>(zr + F, B != nullptr ? B + F : nullptr, i, n);
          if (store_preact) store<T>(zr + F + i, u, n);
          out = out * u;
        }
        store<T>(hr + i, out, n);
      });
    }
  });
}

template <typename T, typename A>
void backward_kernel(const Tensor& z, const Tensor& bias, const Tensor& grad_h, bool gated,
                     const Tensor& grad_z, const Tensor& h) {
  const int64_t rows = grad_h.size(0), F = grad_h.size(1), z_cols = z.size(1);
  const T* Z = z.const_data_ptr<T>();
  const T* B = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  const T* DH = grad_h.const_data_ptr<T>();
  T* DZ = grad_z.data_ptr<T>();  // may alias DH (plain): each step reads before it writes
  T* H = h.defined() ? h.mutable_data_ptr<T>() : nullptr;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(z_cols, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* zr = Z + r * z_cols;
      const T* dhr = DH + r * F;
      T* dzr = DZ + r * z_cols;
      for_each_step<T>(F, [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
        const auto g = preact_at<T>(zr, B, i, n);
        const auto dh = load<T>(dhr + i, n);
        const auto [act, act_grad] = A::value_and_grad(g);
        if (!gated) {
          store<T>(dzr + i, dh * act_grad, n);
          if (H != nullptr) store<T>(H + r * F + i, act, n);
          return;
        }
        const auto u = preact_at<T>(zr + F, B != nullptr ? B + F : nullptr, i, n);
        store<T>(dzr + i, dh * u * act_grad, n);
        store<T>(dzr + F + i, dh * act, n);
        if (H != nullptr) store<T>(H + r * F + i, act * u, n);
      });
    }
  });
}

void activation_forward(const Tensor& z, const Tensor& bias, Activation act, bool gated,
                        bool write_preact, const Tensor& h) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "ffn_act_fwd_cpu", [&] {
    dispatch_activation(act, [&](auto a) {
      forward_kernel<scalar_t, decltype(a)>(z, bias, gated, write_preact, h);
    });
  });
}

void activation_backward(const Tensor& z, const Tensor& bias, const Tensor& grad_h, Activation act,
                         bool gated, const Tensor& grad_z, const Tensor& h) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "ffn_act_bwd_cpu", [&] {
    dispatch_activation(act, [&](auto a) {
      backward_kernel<scalar_t, decltype(a)>(z, bias, grad_h, gated, grad_z, h);
    });
  });
}

}  // namespace

const ActivationKernels kActivationKernels{&activation_forward, &activation_backward};

}  // namespace cpu

TORCH_LIBRARY_IMPL(ffn, CPU, m) {
  register_norm_kernels<cpu::kNormKernels>(m);
  register_activation_kernels<cpu::kActivationKernels>(m);
}

}  // namespace ffn
