// CPU kernels of the FFN ops' fused elementwise passes: bias + activation
// (+ gate * up) forward, the activation's derivative backward (formulas:
// activation.h).
#include "activation.h"
#include "ffn.h"
#include "parallel.h"
#include "vec.h"

#include <torch/csrc/stable/ops.h>

namespace ffn {
namespace cpu {
namespace {

// z + bias as the pre-activation the forward stored (rounded to T).
template <typename T>
C10_ALWAYS_INLINE Pack<T> preact_at(const T* z, const T* bias, int64_t i, int64_t n) {
  const auto v = load<T>(z + i, n);
  return bias == nullptr ? v : round_to<T>(v + load<T>(bias + i, n));
}

// The forward's row loop takes its pointers and sizes as arguments, so they stay in registers:
// held in the parallel_for lambda's captures, they were reloaded from memory at every step after
// each call into Sleef (tanh; float64's exp and erf), which the compiler cannot see into. (The
// backward keeps its loop in the lambda: compiled as separate loops, with and without h, the erf
// GELU's float64 gradient came out different in the last bit between them.)
template <typename T, typename A, bool kGated>
void forward_rows(const T* Z, const T* B, T* H, int64_t F, int64_t z_cols, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const T* zr = Z + r * z_cols;
    T* hr = H + r * F;
    for_each_step<T>(F, [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      const auto g = preact_at<T>(zr, B, i, n);
      auto out = A::value(g);
      if constexpr (kGated) out = out * preact_at<T>(zr + F, B != nullptr ? B + F : nullptr, i, n);
      store<T>(hr + i, out, n);
    });
  }
}

template <typename T, typename A>
void forward_kernel(const Tensor& z, const Tensor& bias, bool gated, const Tensor& h) {
  const int64_t F = h.size(1), z_cols = z.size(1);
  const T* Z = z.const_data_ptr<T>();
  const T* B = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  T* H = h.mutable_data_ptr<T>();
  torch::stable::parallel_for(0, h.size(0), row_grain(z_cols), [&](int64_t begin, int64_t end) {
    (gated ? forward_rows<T, A, true> : forward_rows<T, A, false>)(Z, B, H, F, z_cols, begin, end);
  });
}

// The backward's rows, and with bias_sums (one row of z's width) the column sums of the
// grad_z they store, as stored (rounded to T): the bias gradient, summed while grad_z is in
// registers instead of in another pass over it.
template <typename T, typename A>
void backward_kernel(const Tensor& z, const Tensor& bias, const Tensor& grad_h, bool gated,
                     const Tensor& grad_z, const Tensor& h, const Tensor& grad_bias) {
  using Acc = acc_t<T>;
  const int64_t rows = grad_h.size(0), F = grad_h.size(1), z_cols = z.size(1);
  const T* Z = z.const_data_ptr<T>();
  const T* B = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  const T* DH = grad_h.const_data_ptr<T>();
  // DZ (plain) or H (gated) may alias DH: each step reads its dh before it writes.
  T* DZ = grad_z.mutable_data_ptr<T>();
  T* H = h.defined() ? h.mutable_data_ptr<T>() : nullptr;
  auto backward_rows = [&](int64_t begin, int64_t end, ColumnCascade<Acc>* bias_sums) {
    for (int64_t r = begin; r < end; ++r) {
      const T* zr = Z + r * z_cols;
      const T* dhr = DH + r * F;
      T* dzr = DZ + r * z_cols;
      Acc* sums = bias_sums != nullptr ? bias_sums->block_sums() : nullptr;
      auto store_grad = [&](int64_t i, const Pack<T>& grad, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
        store<T>(dzr + i, grad, n);
        if (sums != nullptr) store<T>(sums + i, load<T>(sums + i, n) + round_to<T>(grad), n);
      };
      for_each_step<T>(F, [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
        const auto g = preact_at<T>(zr, B, i, n);
        const auto dh = load<T>(dhr + i, n);
        if (!gated) {
          const auto [act, grad_g] = A::value_and_grad(g, dh);
          store_grad(i, grad_g, n);
          if (H != nullptr) store<T>(H + r * F + i, act, n);
          return;
        }
        const auto u = preact_at<T>(zr + F, B != nullptr ? B + F : nullptr, i, n);
        const auto [act, grad_g] = A::value_and_grad(g, dh * u);
        store_grad(i, grad_g, n);
        store_grad(F + i, dh * act, n);
        if (H != nullptr) store<T>(H + r * F + i, act * u, n);
      });
      if (bias_sums != nullptr) bias_sums->row_done();
    }
  };
  if (!grad_bias.defined()) {
    torch::stable::parallel_for(0, rows, row_grain(z_cols), [&](int64_t begin, int64_t end) {
      backward_rows(begin, end, nullptr);
    });
    return;
  }
  // Row chunks fixed by the shape, their sums added in chunk order: the same bits for any
  // thread count. Their cascades live in a scratch buffer, so few enough of them to fit 16 MiB
  // (a constant, not the scratch limit, which the environment sets: the bits must not depend on it).
  constexpr int64_t kPartialsMaxBytes = int64_t{16} << 20;
  const int64_t chunk_stride = ColumnCascade<Acc>::kLevels * z_cols;
  const int64_t chunks = std::clamp<int64_t>(kPartialsMaxBytes / (chunk_stride * sizeof(Acc)), 1,
                                             param_grad_chunks(rows, z_cols));
  const Tensor partial =
      scratch(Scratch::kBiasGradPartials, {chunks, chunk_stride}, scalar_type_of<Acc>(), z);
  Acc* levels = partial.mutable_data_ptr<Acc>();
  for_each_row_chunk(rows, z_cols, chunks, [&](int64_t c, int64_t begin, int64_t end) {
    ColumnCascade<Acc> bias_sums(levels + c * chunk_stride, z_cols);
    backward_rows(begin, end, &bias_sums);
    bias_sums.finish();
  });
  sum_chunk_columns(levels + (ColumnCascade<Acc>::kLevels - 1) * z_cols, chunks, z_cols,
                    grad_bias.mutable_data_ptr<T>(), chunk_stride);
}

void activation_forward(const Tensor& z, const Tensor& bias, Activation act, bool gated,
                        const Tensor& h) {
  dispatch_float_types(z.scalar_type(), "ffn_act_fwd_cpu", [&](auto tag) {
    using scalar_t = decltype(tag);
    dispatch_activation<Act>(act, [&](auto a) {
      forward_kernel<scalar_t, decltype(a)>(z, bias, gated, h);
    });
  });
}

Tensor activation_backward(const Tensor& z, const Tensor& bias, const Tensor& grad_h, Activation act,
                           bool gated, const Tensor& grad_z, const Tensor& h, bool bias_grad) {
  const Tensor grad_bias = bias_grad ? empty({z.size(1)}, z) : Tensor();
  dispatch_float_types(z.scalar_type(), "ffn_act_bwd_cpu", [&](auto tag) {
    using scalar_t = decltype(tag);
    dispatch_activation<Act>(act, [&](auto a) {
      backward_kernel<scalar_t, decltype(a)>(z, bias, grad_h, gated, grad_z, h, grad_bias);
    });
  });
  return grad_bias;
}

}  // namespace

const ActivationKernels kActivationKernels{&activation_forward, &activation_backward};

}  // namespace cpu

}  // namespace ffn
